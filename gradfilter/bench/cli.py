"""The ``gradfilter quality-bench`` command: the offline selection-quality benchmark.

See :mod:`gradfilter.bench.quality_bench`; the subcommand is registered by
:func:`gradfilter.cli.main`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from gradfilter.cli import D, score_config_from_args
from gradfilter.method.gsnr import FORMULAS


def _quality(args: argparse.Namespace) -> int:
    from gradfilter.bench.quality_bench import QualityConfig, run_seeds

    qcfg = QualityConfig(
        data=args.data,
        foreign=args.foreign,
        pool=args.pool,
        heldout=args.heldout,
        fraction=args.fraction,
        seed=args.seed,
        methods=[m for m in args.methods.split(",") if m],
        select_ratio=args.select_ratio,
        train_steps=args.train_steps,
        train_batch=args.train_batch,
        eval_every=args.eval_every,
        max_length=args.max_length,
    )
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds else [args.seed]
    scfg = score_config_from_args(args)
    try:
        scfg.validate()
        run_seeds(
            qcfg,
            scfg,
            args.output,
            seeds,
            downstream=not args.no_downstream,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(open(os.path.join(args.output, "aggregate.md"), encoding="utf-8").read())
    print(f"seeds {seeds}; wrote {args.output}")
    return 0


def add_parser(sub: Any) -> None:
    """Add the ``quality-bench`` subcommand to ``sub``."""
    from gradfilter.bench.quality_bench import QualityConfig

    Q = QualityConfig(data="")
    p = sub.add_parser("quality-bench", help="offline selection-quality benchmark")
    p.add_argument("--data", required=True, help="Alpaca-style JSON list to sample the pool from")
    p.add_argument("--foreign", default=None, help="JSON list whose responses serve as 'foreign'")
    p.add_argument("-o", "--output", default="runs/quality")
    p.add_argument("--pool", type=int, default=Q.pool)
    p.add_argument("--heldout", type=int, default=Q.heldout)
    p.add_argument("--fraction", type=float, default=Q.fraction, help="share of the pool corrupted")
    p.add_argument("--methods", default="gsnr,drop,late_var,grand,loss,ifd,ifd_ppl,random")
    p.add_argument("--select-ratio", type=float, default=Q.select_ratio)
    p.add_argument("--train-steps", type=int, default=Q.train_steps)
    p.add_argument("--train-batch", type=int, default=Q.train_batch)
    p.add_argument("--eval-every", type=int, default=Q.eval_every)
    p.add_argument("--no-downstream", action="store_true")
    p.add_argument("--proxy", default=None)
    p.add_argument("--dtype", default=D.dtype, choices=["float32", "bfloat16"])
    p.add_argument("--members", type=int, default=D.members)
    p.add_argument("--rank", type=int, default=D.rank)
    p.add_argument("--epochs", type=int, default=D.epochs)
    p.add_argument("--early", type=int, default=D.early)
    p.add_argument("--late", type=int, default=D.late)
    p.add_argument("--snapshots", default=None, help="as for score (e.g. all)")
    p.add_argument("--warmup-steps", type=int, default=D.warmup_steps)
    p.add_argument("--formula", choices=list(FORMULAS), default=D.formula)
    p.add_argument("--norms", choices=["snapshot", "inflight"], default=D.norms)
    p.add_argument("--lr", type=float, default=D.lr)
    p.add_argument("--lora-layers-from", type=int, default=D.lora_layers_from)
    p.add_argument("--prefix-cache", action="store_true")
    p.add_argument("--batch-size", type=int, default=D.batch_size)
    p.add_argument("--max-length", type=int, default=Q.max_length)
    p.add_argument("--token-budget", type=int, default=D.token_budget)
    p.add_argument("--seed", type=int, default=D.seed)
    p.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds, one run each (OUTDIR/seed-<s>) and an aggregate",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_quality)
