"""The ``gradfilter demo`` and ``gradfilter norms FILE`` commands.

Per-example LoRA gradient norms only: a LoRA-wrapped proxy scores every usable
row of a data file (the shipped demo set for ``demo``) with
:func:`gradfilter.per_example_grad_norms`, prints them largest first and can
check the first rows against the per-example autograd loop
(:func:`gradfilter.norms.oracles.loop_per_example_grad_norms`).  The
subcommands are registered by :func:`gradfilter.cli.main`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from gradfilter.cli import DEFAULT_TARGETS, D


def _load_lora_proxy(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    from gradfilter.io.models import load_proxy

    torch.manual_seed(args.seed)
    base, tok = load_proxy(args.proxy)
    cfg = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        target_modules=[t for t in args.targets.split(",") if t],
    )
    model = get_peft_model(base, cfg)
    if args.init_b:
        # A freshly initialised LoRA has B = 0, so A receives no gradient; a
        # small random B shows both halves of the adapter (as after training).
        gen = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * args.init_b)
    return model.eval(), tok


def _norms(args: argparse.Namespace) -> int:
    import torch

    from gradfilter import per_example_grad_norms
    from gradfilter.io.data import pad_batch

    t0 = time.perf_counter()
    model, tok = _load_lora_proxy(args)
    load_s = time.perf_counter() - t0
    from importlib import resources

    from gradfilter.io.data import encode_row
    from gradfilter.io.rows import load_rows

    data = args.data or str(resources.files("gradfilter").joinpath("resources/demo.jsonl"))
    all_rows, _ = load_rows(data)
    if args.rows:
        all_rows = all_rows[: args.rows]
    rows = [r for r in all_rows if r.status == "ok"]
    for r in all_rows:
        if r.status != "ok":
            print(f"row {r.index}: skipped ({r.status})", file=sys.stderr)
    encoded = [encode_row(r, tok, args.max_length) for r in rows]
    norms: list[float] = []
    tokens = 0
    t0 = time.perf_counter()
    for start in range(0, len(encoded), args.batch_size):
        chunk = encoded[start : start + args.batch_size]
        ids, labels, mask = pad_batch(chunk, tok.pad_token_id)
        tokens += int(mask.sum())
        norms += per_example_grad_norms(model, ids, labels, mask).tolist()
        print(f"\rscored {len(norms)}/{len(encoded)} rows", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    score_s = time.perf_counter() - t0

    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"proxy: {args.proxy or 'SmolLM2-135M-Instruct (offline GGUF)'}; LoRA r={args.rank} "
        f"alpha={args.alpha} on {args.targets} ({n_lora:,} trainable parameters)"
    )
    print(
        f"loaded in {load_s:.1f} s; {len(rows)} rows, {tokens} tokens scored in {score_s:.2f} s "
        f"({tokens / max(score_s, 1e-9):.0f} tokens/s, one forward + one backward per batch)"
    )
    order = sorted(range(len(rows)), key=lambda i: (-_key(norms[i]), i))
    print("\nper-example LoRA gradient norm (response loss), largest first:")
    for rank, i in enumerate(order, 1):
        r = rows[i]
        text = (
            f"{r.instruction} -> {r.output}"
            if r.kind == "alpaca"
            else " | ".join(m.get("content", "") for m in r.messages or [])
        ).replace("\n", " ")
        print(f"{rank:3d}. {norms[i]:9.4f}  row {r.index:3d}  {text[:90]}")

    if args.check:
        from gradfilter.norms.oracles import loop_per_example_grad_norms

        k = min(args.check, len(encoded))
        ids, labels, mask = pad_batch(encoded[:k], tok.pad_token_id)
        want = loop_per_example_grad_norms(model, ids, labels, mask)
        got = torch.tensor(norms[:k], dtype=torch.float64)
        rel = ((got - want.double()).abs() / want.double().abs()).nan_to_num(0.0).max().item()
        print(
            f"\ncheck against the per-example autograd loop on {k} rows: "
            f"max relative difference {rel:.2e}"
        )
        if rel > 1e-3:
            return 1
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for r, n in zip(rows, norms, strict=False):
                f.write(json.dumps({"index": r.index, "id": r.id, "grad_norm": _num(n)}) + "\n")
    return 0


def _num(x: float) -> float | None:
    return None if x != x else x


def _key(x: float) -> float:
    return float("-inf") if x != x else x


def add_parsers(sub: Any) -> None:
    """Add the ``demo`` and ``norms`` subcommands to ``sub``."""
    for name, helptext in (
        ("demo", "per-example LoRA gradient norms of the shipped demo set on the offline proxy"),
        ("norms", "per-example LoRA gradient norms of an Alpaca JSON/JSONL file"),
    ):
        p = sub.add_parser(name, help=helptext)
        if name == "norms":
            p.add_argument("data", help="Alpaca-style JSON list or JSONL file")
            p.add_argument("-o", "--output", help="write {index, grad_norm} JSONL here")
        p.add_argument(
            "--proxy",
            default=None,
            help="hub id, local model folder or .gguf file (default: offline SmolLM2-135M)",
        )
        p.add_argument("--rank", type=int, default=D.rank)
        p.add_argument("--alpha", type=float, default=D.alpha)
        p.add_argument("--targets", default=DEFAULT_TARGETS)
        p.add_argument("--rows", type=int, default=0, help="score only the first N rows")
        p.add_argument("--batch-size", type=int, default=D.batch_size)
        p.add_argument("--max-length", type=int, default=256)
        p.add_argument("--seed", type=int, default=D.seed)
        p.add_argument(
            "--init-b",
            type=float,
            default=0.02,
            help="std of a random LoRA B init (0 keeps peft's zeros)",
        )
        p.add_argument(
            "--check",
            type=int,
            default=4 if name == "demo" else 0,
            help="verify the first N rows against the per-example autograd loop",
        )
        p.set_defaults(data=None, output=None, func=_norms)
