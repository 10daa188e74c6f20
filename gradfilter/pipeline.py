"""GradFiltering end to end (compatibility module): the run lives in
:mod:`gradfilter.run`; these names stay importable from here."""

from gradfilter.run.score import (  # noqa: F401  (the public names)
    CHECKPOINT_FILE,
    NORMS_FILE,
    RUN_FILE,
    SCORES_FILE,
    ScoreConfig,
    ScoreResult,
    read_norms,
    read_scores,
    rescore,
    score,
    select,
)
