"""Offline selection-quality benchmark: how well does each selector select?

1. Sample a pool of real rows (seeded) and a held-out set of clean rows that are
   not in the pool.
2. Corrupt a known fraction of the pool (:func:`gradfilter.bench.quality.corrupt`).
3. Score the pool with every method through the same data path and proxy
   (:func:`gradfilter.run.score.score`), timing each.
4. Detection: AUROC of clean against corrupted, and the corrupted share of the
   top 5 / 10 / 15 %.
5. Downstream: train one LoRA adapter on the proxy per method on its top
   ``select_ratio`` (and on random subsets with several seeds), all with the
   same number of steps and batch size, and record the held-out loss against
   steps.  The adapters are members of one :class:`LoRAEnsemble`, so they train
   side by side in one folded pass.

Everything lands in ``OUTDIR``: ``pool.jsonl``, ``labels.jsonl``, one folder of
scores per method, ``results.json``, ``results.md`` and ``heldout_loss.png``.

The G-SNR run also yields, from its stored norms and without more training,
every formula of :data:`gradfilter.method.gsnr.FORMULAS` (``gsnr:<formula>``) and the
parts ``late_cv`` and ``late_norm`` (lower kept).  A method whose folder holds
finished scores of the same settings is not scored again, so an interrupted
benchmark resumes.  With several seeds (:func:`run_seeds`) each seed gets its
own pool, corruption and folder ``OUTDIR/seed-<s>``, and ``aggregate.json`` /
``aggregate.md`` hold the mean, standard deviation and range over seeds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from gradfilter.bench.aggregate import aggregate, aggregate_markdown, run_seeds

__all__ = [
    "QualityConfig",
    "aggregate",
    "aggregate_markdown",
    "run",
    "run_seeds",
    "trajectory_scores",
]


@dataclasses.dataclass
class QualityConfig:
    data: str
    foreign: str | None = None
    pool: int = 400
    heldout: int = 100
    fraction: float = 0.2
    seed: int = 0
    methods: Sequence[str] = (
        "gsnr",
        "drop",
        "late_var",
        "grand",
        "loss",
        "ifd",
        "ifd_ppl",
        "random",
    )
    select_ratio: float = 0.1
    random_seeds: Sequence[int] = (0, 1, 2)
    train_steps: int = 60
    train_batch: int = 4
    eval_every: int = 10
    eval_at_start: bool = True  # the held-out loss before training (the same for every subset)
    lr: float = 2e-4
    max_length: int = 256  # the benchmark's rows are short; the run itself reads score_cfg
    formulas: Sequence[str] = ("paper", "log_cv", "snr_cv", "rank", "length_level")


def _sample(
    rows: list[dict], n_pool: int, n_heldout: int, seed: int
) -> tuple[list[dict], list[dict]]:
    usable = [
        r
        for r in rows
        if isinstance(r.get("output"), str)
        and r["output"].strip()
        and isinstance(r.get("instruction"), str)
    ]
    if len(usable) < n_pool + n_heldout:
        raise ValueError(f"{len(usable)} usable rows, need pool {n_pool} + held-out {n_heldout}")
    order = np.random.default_rng(seed).permutation(len(usable))
    pool = [usable[i] for i in order[:n_pool]]
    heldout = [usable[i] for i in order[n_pool : n_pool + n_heldout]]
    return pool, heldout


def _keep_scores(records: list[dict], method: str) -> np.ndarray:
    """Scores where higher means keep; NaN (unscored, discarded) ranks lowest."""
    from gradfilter.method.registry import METHODS

    s = np.array([np.nan if r["score"] is None else r["score"] for r in records], dtype=float)
    return s if METHODS[method].higher_is_better else -s


def _values(records: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else r[key] for r in records], dtype=float)


def trajectory_scores(
    outdir: str,
    score_cfg: Any,
    formulas: Sequence[str],
    early: int | None = None,
    late: int | None = None,
) -> dict[str, np.ndarray]:
    """Keep-scores (higher = keep; NaN for unscored rows) of every G-SNR formula
    (``gsnr:<formula>``) and part (``drop``, ``late_var``, ``late_cv``,
    ``late_norm``, ``grand``), from the norms stored by a finished ensemble run
    in ``outdir``, at epochs ``early`` / ``late`` (default: the run's own)."""
    from gradfilter.method.gsnr import gsnr_components
    from gradfilter.run.score import read_norms

    norms = read_norms(outdir)
    epochs = [int(e) for e in norms["epoch"]]
    ok = norms["scored"]
    early_sq = norms["sq"][ok][:, :, epochs.index(early or score_cfg.early)]
    late_sq = norms["sq"][ok][:, :, epochs.index(late or score_cfg.late)]
    n = norms["sq"].shape[0]
    rows = json.loads(str(norms["rows"])) if "rows" in norms else None
    lengths = None if rows is None else [rows[i]["n_response_tokens"] or 0 for i in ok]

    def full(x: np.ndarray) -> np.ndarray:
        out = np.full(n, np.nan)
        out[ok] = x
        return out

    out: dict[str, np.ndarray] = {}
    for f in formulas:
        cfg = dataclasses.replace(score_cfg, formula=f).gsnr_config()
        if f == "length_level" and lengths is None:
            continue  # a norms file written before the rows' fields were stored in it
        comp = gsnr_components(early_sq, late_sq, cfg, lengths)
        out[f"gsnr:{f}"] = full(comp["gsnr"])
    out.update(
        drop=full(comp["drop"]),
        late_var=full(-comp["late_var"]),
        late_cv=full(-comp["late_cv"]),
        late_norm=full(-comp["late_mean"]),
        grand=full(comp["early_mean"]),
    )
    return out


def _finished(folder: str, mcfg: Any) -> Any:
    """The records and run of a finished scoring of ``mcfg`` in ``folder``, or None."""
    from gradfilter.run.score import read_scores

    try:
        records, run = read_scores(folder)
    except (FileNotFoundError, ValueError, json.JSONDecodeError):
        return None
    same = json.loads(json.dumps(dataclasses.asdict(mcfg)))
    theirs = dict(run.get("config") or {})
    if mcfg.early_after:  # the run resolved these from early_after and its rows
        from gradfilter.run.config import RESOLVED_FIELDS

        for k in RESOLVED_FIELDS:
            theirs.pop(k, None)
            same.pop(k)
    return (records, run) if theirs == same else None


def _encode_all(rows: list[dict], tok: Any, max_length: int) -> list[Any]:
    from gradfilter.io.data import encode_row
    from gradfilter.io.rows import load_rows

    loaded, _ = load_rows(rows)
    return [encode_row(r, tok, max_length) for r in loaded]


def _heldout_losses(ens: Any, heldout: list[Any], pad_id: int, batch: int) -> list[float]:
    from gradfilter.io.data import pad_batch

    sums = torch.zeros(ens.members, dtype=torch.float64)
    counts = torch.zeros(ens.members, dtype=torch.float64)
    ens.eval()
    with torch.no_grad():
        for i in range(0, len(heldout), batch):
            ids, labels, mask = pad_batch(heldout[i : i + batch], pad_id)
            s, c = ens.member_ce_sums(ens.fold(ids), ens.fold(labels), ens.fold(mask))
            sums += s.double().cpu()
            counts += c.double().cpu()
    return (sums / counts.clamp(min=1)).tolist()


def _downstream(
    cfg: QualityConfig,
    score_cfg: Any,
    model: Any,
    tok: Any,
    subsets: dict[str, list[int]],
    pool_enc: list[Any],
    held_enc: list[Any],
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Train one adapter per subset for the same number of steps; held-out loss curves."""
    from gradfilter.io.data import pad_batch
    from gradfilter.method.ensemble import LoRAEnsemble
    from gradfilter.run.score import pad_id_of

    names = list(subsets)
    ens = LoRAEnsemble(
        model,
        members=len(names),
        r=score_cfg.rank,
        alpha=score_cfg.alpha,
        dropout=score_cfg.dropout,
        target_modules=score_cfg.targets,
        member_seeds=[cfg.seed] * len(names),
    )  # same init: only the data differ
    opt = ens.make_optimizer(lr=cfg.lr)
    pad_id = pad_id_of(tok)
    rngs = [np.random.default_rng(cfg.seed + 17 * k) for k in range(len(names))]
    orders = [list(rngs[k].permutation(subsets[n])) for k, n in enumerate(names)]
    cursors = [0] * len(names)
    curves: dict[str, list[tuple[int, float]]] = {n: [] for n in names}
    t0 = time.perf_counter()
    for step in range(cfg.train_steps + 1):
        due = step % cfg.eval_every == 0 and (step > 0 or cfg.eval_at_start)
        if due or step == cfg.train_steps:
            for n, loss in zip(
                names, _heldout_losses(ens, held_enc, pad_id, cfg.train_batch * 2), strict=False
            ):
                curves[n].append((step, loss))
        if step == cfg.train_steps:
            break
        batches = []
        for k in range(len(names)):
            idx = []
            while len(idx) < cfg.train_batch:
                if cursors[k] == len(orders[k]):
                    orders[k] = list(rngs[k].permutation(subsets[names[k]]))
                    cursors[k] = 0
                idx.append(orders[k][cursors[k]])
                cursors[k] += 1
            batches.append(pad_batch([pool_enc[i] for i in idx], pad_id))
        # None (sized per score run from the memory at hand): 2048 tokens here.
        budget = score_cfg.token_budget if score_cfg.token_budget is not None else 2048
        ens.train_step(batches, opt, max_tokens=budget)
        if step % cfg.eval_every == 0:
            say(f"downstream step {step}/{cfg.train_steps}")
    ens.remove()
    return {
        "curves": curves,
        "seconds": time.perf_counter() - t0,
        "final": {n: c[-1][1] for n, c in curves.items()},
    }


def _prepare_pool(
    cfg: QualityConfig, outdir: str
) -> tuple[list[dict], list[dict], np.ndarray, str]:
    """Sample and corrupt the pool; write ``pool.jsonl`` and ``labels.jsonl``.

    Returns ``(pool, heldout, corrupted, pool_path)``.
    """
    from gradfilter.bench.quality import corrupt, corrupted_mask

    with open(cfg.data, encoding="utf-8") as f:
        rows = json.load(f)
    foreign = None
    if cfg.foreign:
        with open(cfg.foreign, encoding="utf-8") as f:
            foreign = json.load(f)
    pool, heldout = _sample(rows, cfg.pool, cfg.heldout, cfg.seed)
    pool, labels = corrupt(pool, cfg.fraction, cfg.seed, foreign_rows=foreign)
    corrupted = corrupted_mask(labels)
    pool_path = os.path.join(outdir, "pool.jsonl")
    with open(pool_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in pool)
    with open(os.path.join(outdir, "labels.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(lab) + "\n" for lab in labels)
    return pool, heldout, corrupted, pool_path


def _score_methods(
    cfg: QualityConfig,
    score_cfg: Any,
    outdir: str,
    pool_path: str,
    model_and_tokenizer: tuple[Any, Any],
    progress: bool,
    say: Callable[[str], None],
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, float]]]:
    """Score the pool with every method (reusing finished folders); keep-scores and timings."""
    from gradfilter.method.registry import METHODS
    from gradfilter.run.records import RECORD_FIELDS
    from gradfilter.run.score import score

    keep: dict[str, np.ndarray] = {}
    timing: dict[str, dict[str, float]] = {}
    # G-SNR, its two parts and the early norm (GraNd-like) all come from one
    # ensemble run: the early snapshot is the state a 1-epoch run would reach.
    shared = [m for m in cfg.methods if m in ("gsnr", "drop", "late_var", "grand")]
    runs = ([("gsnr", shared)] if shared else []) + [
        (m, [m]) for m in cfg.methods if m not in shared
    ]
    for method, covers in runs:
        mcfg = dataclasses.replace(score_cfg, method=method)
        folder = os.path.join(outdir, method)
        done = _finished(folder, mcfg)
        if done is not None:
            say(f"{method}: finished scores found in {folder}")
            records, run_info = done
        else:
            say(
                f"scoring the pool with {method}"
                + (f" (also gives {', '.join(covers[1:])})" if len(covers) > 1 else "")
            )
            res = score(
                pool_path,
                folder,
                mcfg,
                progress=progress,
                model_and_tokenizer=model_and_tokenizer,
                log=say,
            )
            records, run_info = res.records, res.run
        t = run_info["timings"]
        for m in covers:
            # the run's own method is its score; the others sharing the run are fields
            field = "score" if m == method else RECORD_FIELDS[METHODS[m].source]
            recs = [{**r, "score": r[field]} for r in records]
            keep[m] = _keep_scores(recs, m)
            timing[m] = {
                "seconds": t["total_s"] - t.get("load_s", 0.0),
                "tokens_per_second": run_info["tokens_per_second"],
                "shared_run": method if len(covers) > 1 else None,
            }
        if method == "gsnr":
            extra = trajectory_scores(folder, mcfg, cfg.formulas)
            keep.update({k: v for k, v in extra.items() if k not in keep})
    return keep, timing


def _downstream_results(
    cfg: QualityConfig,
    score_cfg: Any,
    model_and_tokenizer: tuple[Any, Any],
    keep: dict[str, np.ndarray],
    pool: list[dict],
    heldout: list[dict],
    corrupted: np.ndarray,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Pick each method's top subset and random subsets, and train on them (:func:`_downstream`)."""
    from gradfilter.method.gsnr import select_top

    model, tok = model_and_tokenizer
    k = max(1, math.floor(cfg.select_ratio * len(pool)))
    subsets = {m: select_top(keep[m], top_k=k).tolist() for m in keep if m != "random"}
    empty = [m for m, idx in subsets.items() if not idx]
    if empty:
        say(f"no downstream training for {', '.join(empty)}: no row scored")
        subsets = {m: idx for m, idx in subsets.items() if idx}
    for s in cfg.random_seeds:
        subsets[f"random-{s}"] = np.random.default_rng(1000 + s).permutation(len(pool))[:k].tolist()
    pool_enc = _encode_all(pool, tok, score_cfg.max_length)
    held_enc = _encode_all(heldout, tok, score_cfg.max_length)
    out = _downstream(cfg, score_cfg, model, tok, subsets, pool_enc, held_enc, say)
    out["subsets"] = subsets
    out["corrupted_share"] = {n: float(corrupted[idx].mean()) for n, idx in subsets.items()}
    return out


def _write_results(cfg: QualityConfig, outdir: str, results: dict[str, Any]) -> None:
    """Write ``results.json``, ``results.md`` and (with downstream) ``heldout_loss.png``."""
    from gradfilter.bench.quality import markdown_table

    with open(os.path.join(outdir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    timing = results["timing"]
    md = ["## Detection of corrupted rows", "", markdown_table(results["detection"]), ""]
    md += ["## Scoring time", "", "| method | seconds | tokens/s |", "|---|---|---|"]
    md += [
        f"| {m} | {v['seconds']:.1f} | {v['tokens_per_second']:.0f} |" for m, v in timing.items()
    ]
    if "downstream" in results:
        d = results["downstream"]
        md += [
            "",
            f"## Held-out loss after {cfg.train_steps} steps (top {cfg.select_ratio:.0%})",
            "",
            "| subset | corrupted share | held-out loss |",
            "|---|---|---|",
        ]
        md += [
            f"| {n} | {100 * d['corrupted_share'][n]:.1f}% | {d['final'][n]:.4f} |"
            for n in sorted(d["final"], key=d["final"].get)
        ]
        _plot_curves(d["curves"], os.path.join(outdir, "heldout_loss.png"))
    with open(os.path.join(outdir, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")


def run(
    cfg: QualityConfig,
    score_cfg: Any,
    outdir: str,
    *,
    downstream: bool = True,
    model_and_tokenizer: tuple[Any, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns (and writes) the results."""
    from gradfilter.bench.quality import summary
    from gradfilter.method.registry import METHODS

    say = log or (lambda s: print(s, file=sys.stderr))
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    os.makedirs(outdir, exist_ok=True)
    pool, heldout, corrupted, pool_path = _prepare_pool(cfg, outdir)

    if model_and_tokenizer is None:
        from gradfilter.io.models import load_proxy

        model_and_tokenizer = load_proxy(score_cfg.proxy, dtype=getattr(torch, score_cfg.dtype))
    model, tok = model_and_tokenizer
    keep, timing = _score_methods(cfg, score_cfg, outdir, pool_path, (model, tok), progress, say)
    table = summary(keep, corrupted)
    results: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "score_config": dataclasses.asdict(score_cfg),
        "corrupted_rows": int(corrupted.sum()),
        "detection": table,
        "timing": timing,
    }
    if downstream:
        results["downstream"] = _downstream_results(
            cfg, score_cfg, (model, tok), keep, pool, heldout, corrupted, say
        )
    _write_results(cfg, outdir, results)
    return results


def _plot_curves(curves: dict[str, list[tuple[int, float]]], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, pts in curves.items():
        style = ":" if name.startswith("random") else "-"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
    ax.set_xlabel("training steps")
    ax.set_ylabel("held-out loss (clean rows)")
    ax.set_title("LoRA trained on each selector's subset, same budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
