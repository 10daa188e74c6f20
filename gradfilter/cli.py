"""Command line.

``gradfilter score [DATA] -o OUTDIR``   G-SNR scores of every row (DATA defaults
                                        to the shipped demo set)
``gradfilter rescore OUTDIR``           scores again from the stored norms
``gradfilter select OUTDIR --ratio R``  the top rows, in the input's own format
``gradfilter demo`` / ``norms FILE``    per-example gradient norms only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from gradfilter.method.gsnr import FORMULAS
from gradfilter.method.registry import METHODS
from gradfilter.run.config import ScoreConfig

#: The one source of the CLI's defaults.
D = ScoreConfig()

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj"


def _score(args: argparse.Namespace) -> int:
    from importlib import resources

    from gradfilter.run.score import score

    data = args.data
    if data is None:
        data = str(resources.files("gradfilter").joinpath("resources/demo.jsonl"))
        print(f"no DATA given: scoring the shipped demo set ({data})", file=sys.stderr)
    fields = {}
    for item in args.field or []:
        if "=" not in item:
            raise SystemExit(f"--field expects NAME=COLUMN, got {item!r}")
        k, v = item.split("=", 1)
        fields[k] = v
    targets = args.targets
    if targets is not None and targets != "all-linear":
        targets = [t for t in targets.split(",") if t]
    config = score_config_from_args(args, targets=targets, fields=fields)
    try:
        result = score(
            data,
            None if args.dry_run else args.output,
            config,
            progress=not args.no_progress,
            dry_run=args.dry_run,
            force=args.force,
            stream=args.stream,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from gradfilter.run.dist import world_from_env

    if not world_from_env().main:
        return 0  # rank 0 reports for the whole run
    if args.dry_run:
        print(json.dumps(result.run["plan"], indent=2))
        return 0
    run = result.run
    print(
        f"scored {run['plan']['scorable_rows']} of {run['plan']['rows']} rows ({args.method}) in "
        f"{run['timings']['total_s']:.1f} s ({run['tokens_per_second']:.0f} tokens/s, "
        f"padding {100 * run['padding_fraction']:.1f}%); wrote {args.output}/scores.jsonl, "
        f"run.json and plots"
    )
    _show(result, args.show)
    return 0


def score_config_from_args(args: argparse.Namespace, **given: Any) -> ScoreConfig:
    """The :class:`ScoreConfig` of a command line: every parsed option named like a
    field, ``--snapshots`` and ``--token-budget`` converted, then ``given``; fields
    the command has no option for keep their defaults."""
    names = {f.name for f in dataclasses.fields(ScoreConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if values.get("early_after") is None and any(
        getattr(args, k, None) is not None for k in ("epochs", "early", "late")
    ):
        values["early_after"] = 0  # epochs given by hand are taken literally
    values["snapshots"] = _snapshots(args.snapshots, values.get("epochs", ScoreConfig.epochs))
    values["token_budget"] = args.token_budget
    return ScoreConfig(**{**values, **given})


def _snapshots(text: str | None, epochs: int) -> list[int] | None:
    if text is None:
        return None
    if text == "all":
        return list(range(1, epochs + 1))
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--snapshots expects epochs like 1,2,4 or 'all', got {text!r}") from None


def _rescore(args: argparse.Namespace) -> int:
    from gradfilter.run.score import rescore

    opts = {
        k: getattr(args, k)
        for k in ("formula", "early", "late", "method", "drop", "spread", "of", "ddof", "eps")
    }
    try:
        result = rescore(args.outdir, output=args.output, plots=not args.no_plots, **opts)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = result.run["config"]
    print(
        f"rescored {sum(r['score'] is not None for r in result.records)} rows "
        f"({c['method']}, formula {c['formula']}, "
        f"early epoch {c['early']}, late epoch {c['late']}); "
        f"wrote {result.outdir}/scores.jsonl"
    )
    return 0


def _show(result: Any, k: int) -> None:
    from gradfilter.run.records import Records

    if isinstance(result.records, Records):  # a streamed run: read only the rows shown
        recs, bad, n_bad = _shown_records(result.records, k)
    else:
        recs = sorted(
            (r for r in result.records if r["score"] is not None), key=lambda r: r["rank"]
        )
        bad = [r for r in result.records if r["status"] != "ok"]
        n_bad = len(bad)
    method = result.run.get("method", "gsnr")
    rows = {r.index: r for r in result.rows} if not result.run.get("stream") else {}

    def line(r: dict) -> str:
        row = rows.get(r["index"])
        if row is None:  # a streamed run holds no texts
            text = f"id {r['id']}"
        elif row.kind == "chat":
            text = " | ".join(m.get("content", "") for m in row.messages or [])
        else:
            text = f"{row.instruction} -> {row.output}"
        flat = text.replace(chr(10), " ")[:80]
        return f"{r['rank']:5d}  {r['score']:12.4g}  row {r['index']:5d}  {flat}"

    if k and recs:
        print(f"\ntop {min(k, len(recs))} by {method} (rank, score, row, text):")
        for r in recs[:k]:
            print(line(r))
        print(f"\nbottom {min(k, len(recs))}:")
        for r in recs[-k:]:
            print(line(r))
    if bad:
        print(f"\n{n_bad} rows not scored:")
        for r in bad[: k or 10]:
            print(f"  row {r['index']}: {r['status']}")


def _shown_records(records: Any, k: int) -> tuple[list[dict], list[dict], int]:
    """The top and bottom ``k`` scored records, the first unscored ones and their
    number, of a streamed run's :class:`~gradfilter.run.records.Records`, without
    making the other records."""
    import numpy as np

    scored = np.flatnonzero(np.isfinite(records.column("score")))
    order = scored[np.argsort(records.ranks[scored], kind="stable")]
    pick = order if len(order) <= 2 * k else np.concatenate([order[:k], order[len(order) - k :]])
    statuses = records.meta.statuses  # the rows that are not "ok"
    bad = [records.record(i) for i in sorted(statuses)[: k or 10]]
    return [records.record(int(i)) for i in pick], bad, len(statuses)


def _select(args: argparse.Namespace) -> int:
    from gradfilter.run.score import select

    if (args.ratio is None) == (args.top_k is None):
        raise SystemExit("give exactly one of --ratio and --top-k")
    try:
        written, chosen = select(
            args.outdir, ratio=args.ratio, top_k=args.top_k, output=args.output, order=args.order
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"selected {len(chosen)} rows -> {written}")
    return 0


def _add_score_input_args(p: argparse.ArgumentParser) -> None:
    """Score arguments: the data, the output folder, the proxy and the method."""
    p.add_argument(
        "data",
        nargs="?",
        default=None,
        help="Alpaca JSON/JSONL, chat messages JSONL, Parquet or a saved HF dataset "
        "(default: the shipped demo set)",
    )
    p.add_argument("-o", "--output", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument(
        "--proxy",
        default=None,
        help="hub id (e.g. gpt2), local model folder or .gguf file "
        "(default: SmolLM2-135M-Instruct, offline)",
    )
    p.add_argument(
        "--method",
        choices=list(METHODS),
        default="gsnr",
        help="gsnr (default); ablations drop, late_var, grand (early norm); "
        "baselines random, loss, ifd (loss ratio), ifd_ppl (perplexity ratio)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16", "float64"],
        default="float32",
        help="proxy weights (bfloat16: faster, norms to ~1e-2)",
    )


def _add_score_adapter_args(p: argparse.ArgumentParser) -> None:
    """Score arguments: the LoRA ensemble (members, adapter shape, layers)."""
    p.add_argument("--members", type=int, default=D.members)
    p.add_argument("--rank", type=int, default=D.rank)
    p.add_argument("--alpha", type=float, default=D.alpha)
    p.add_argument("--dropout", type=float, default=D.dropout)
    p.add_argument(
        "--targets",
        default=None,
        help="comma-separated layer names, or all-linear (default: attention projections)",
    )
    p.add_argument(
        "--lora-layers-from",
        type=int,
        default=D.lora_layers_from,
        metavar="K",
        help="adapters only on decoder layers K..L-1 (default 0: all layers)",
    )
    p.add_argument(
        "--prefix-cache",
        action="store_true",
        help="with --lora-layers-from K > 0, run the frozen layers below K once per "
        "row and reuse their output across members, epochs and snapshots",
    )


def _add_score_snapshot_args(p: argparse.ArgumentParser) -> None:
    """Score arguments: epochs, the snapshots whose norms are kept, and the formula."""
    p.add_argument("--epochs", type=int, default=None, help=f"epochs trained ({D.epochs})")
    p.add_argument("--early", type=int, default=None, help=f"the early norms' epoch ({D.early})")
    p.add_argument("--late", type=int, default=None, help=f"the late norms' epoch ({D.late})")
    p.add_argument(
        "--snapshots",
        default=None,
        metavar="EPOCHS",
        help="epochs whose norms are kept in OUTDIR/norms.npz, e.g. 1,2,3 or all "
        "(default: early and late); rescore can then use any of them",
    )
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=D.warmup_steps,
        metavar="N",
        help="optimizer steps trained before epoch 1, nothing recorded",
    )
    p.add_argument(
        "--early-after",
        type=int,
        default=None,
        metavar="S",
        help="the early point at least S optimizer steps into training: on small data "
        "--early, --late and --epochs move on by whole epochs until it is (0: as given; "
        f"default {D.early_after}, or 0 when --epochs, --early or --late is given)",
    )
    p.add_argument(
        "--formula",
        choices=list(FORMULAS),
        default=D.formula,
        help="paper: D / (V + eps); log_cv, snr_cv, rank: scale-free (see docs)",
    )
    p.add_argument(
        "--norms",
        choices=["snapshot", "inflight"],
        default=D.norms,
        help="snapshot: eval-mode norm passes after epochs --early and --late; "
        "inflight: norms recorded by the training steps of those epochs (no "
        "extra pass; dropout active, parameters moving within the epoch)",
    )


def _add_score_training_args(p: argparse.ArgumentParser) -> None:
    """Score arguments: optimisation, batching, tokenisation, seed, template and loss reduction."""
    p.add_argument("--lr", type=float, default=D.lr)
    p.add_argument("--batch-size", type=int, default=D.batch_size, help="rows per member per step")
    p.add_argument(
        "--token-budget",
        type=int,
        default=D.token_budget,
        help="at most this many padded tokens in one folded forward/backward (all "
        "members): snapshot batches are cut, training steps accumulate "
        "(default: sized from the available memory; 0 = no limit)",
    )
    p.add_argument("--max-length", type=int, default=D.max_length)
    p.add_argument("--seed", type=int, default=D.seed)
    p.add_argument(
        "--device",
        default=D.device,
        help="auto (CUDA when available, under torchrun the process's LOCAL_RANK GPU; "
        "else the CPU), cpu, cuda or cuda:N",
    )
    p.add_argument(
        "--parallel",
        default=D.parallel,
        help="under torchrun: auto (member-parallel when the processes are at most the "
        "members, else member groups x data-parallel processes), member, data, or AxB "
        "(A member groups x B processes each); see docs/scale-out.md",
    )
    p.add_argument(
        "--template",
        default=None,
        help="prompt template with {instruction} and {input} (Alpaca rows)",
    )
    p.add_argument("--reduction", choices=["mean", "sum"], default="mean")


def _add_score_gsnr_args(p: argparse.ArgumentParser) -> None:
    """Score arguments: the definition of the G-SNR parts."""
    p.add_argument(
        "--drop", choices=["normalized", "log_ratio", "unnormalized"], default="normalized"
    )
    p.add_argument("--spread", choices=["var", "std"], default="var")
    p.add_argument("--of", choices=["squared", "norm"], default="squared")
    p.add_argument("--ddof", type=int, choices=[0, 1], default=D.ddof)
    p.add_argument("--eps", type=float, default=D.eps)


def _add_score_run_args(p: argparse.ArgumentParser) -> None:
    """Score arguments: field mapping, dry run, progress, resumption and output."""
    p.add_argument(
        "--field",
        action="append",
        metavar="NAME=COLUMN",
        help="map a field: instruction, input, output, messages or id",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="report rows, tokens and planned work only"
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="read the rows as a stream into OUTDIR/rows/ instead of holding them in memory "
        "(corpora larger than memory; JSON Lines, Parquet or a saved dataset)",
    )
    p.add_argument(
        "--host-memory",
        choices=["fast", "lean"],
        default=D.host_memory,
        help="CPU runs: fast keeps freed memory for reuse (1.7x faster, peak 1.6x, measured); "
        "lean returns it at once (default fast)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--force", action="store_true", help="replace the outputs of another run in the folder"
    )
    p.add_argument(
        "--checkpoint-seconds",
        type=float,
        default=D.checkpoint_seconds,
        help="save the resumable state at most this often (default 60)",
    )
    p.add_argument("--show", type=int, default=5, help="print the top and bottom N rows")


def _add_score_parser(sub: Any) -> None:
    """Add the ``score`` subcommand to ``sub``."""
    p = sub.add_parser("score", help="G-SNR scores of every row of an instruction dataset")
    _add_score_input_args(p)
    _add_score_adapter_args(p)
    _add_score_snapshot_args(p)
    _add_score_training_args(p)
    _add_score_gsnr_args(p)
    _add_score_run_args(p)
    p.set_defaults(func=_score)


def _add_rescore_parser(sub: Any) -> None:
    """Add the ``rescore`` subcommand to ``sub``."""
    p = sub.add_parser(
        "rescore",
        help="recompute scores and ranks of a finished run from "
        "its stored norms (no model, seconds)",
    )
    p.add_argument("outdir")
    p.add_argument("-o", "--output", default=None, help="write here instead of OUTDIR")
    p.add_argument("--formula", choices=list(FORMULAS), default=None)
    p.add_argument("--early", type=int, default=None)
    p.add_argument("--late", type=int, default=None)
    p.add_argument("--method", choices=["gsnr", "drop", "late_var", "grand"], default=None)
    p.add_argument("--drop", choices=["normalized", "log_ratio", "unnormalized"], default=None)
    p.add_argument("--spread", choices=["var", "std"], default=None)
    p.add_argument("--of", choices=["squared", "norm"], default=None)
    p.add_argument("--ddof", type=int, choices=[0, 1], default=None)
    p.add_argument("--eps", type=float, default=None)
    p.add_argument("--no-plots", action="store_true", help="write scores and run.json only")
    p.set_defaults(func=_rescore)


def _add_select_parser(sub: Any) -> None:
    """Add the ``select`` subcommand to ``sub``."""
    p = sub.add_parser("select", help="write the top rows of a scored run")
    p.add_argument("outdir")
    p.add_argument("--ratio", type=float, default=None, help="keep floor(ratio x input rows)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("-o", "--output", default=None, help="default OUTDIR/selected.<input format>")
    p.add_argument("--order", choices=["rank", "input"], default="rank")
    p.set_defaults(func=_select)


def main(argv: list[str] | None = None) -> int:
    from gradfilter.bench import cli as bench_cli
    from gradfilter.norms import cli as norms_cli

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(
        prog="gradfilter", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_score_parser(sub)
    _add_rescore_parser(sub)
    _add_select_parser(sub)
    bench_cli.add_parser(sub)
    norms_cli.add_parsers(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
