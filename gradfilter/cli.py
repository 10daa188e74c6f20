"""Command line: ``gradfilter demo`` and ``gradfilter norms``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj"


def _load_lora_proxy(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    from .models import load_proxy

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


def _read_rows(path: str | None) -> list[dict[str, Any]]:
    from .data import demo_rows

    if path is None:
        return demo_rows()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}: line {n} is not valid JSON ({e.msg})") from None
    for i, row in enumerate(rows):
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str):
                raise SystemExit(f"{path}: row {i} has no string field {key!r}")
    return rows


def _norms(args: argparse.Namespace) -> int:
    import torch

    from . import per_example_grad_norms
    from .data import encode_pair, format_prompt, pad_batch

    t0 = time.perf_counter()
    model, tok = _load_lora_proxy(args)
    load_s = time.perf_counter() - t0
    rows = _read_rows(args.data)
    if args.rows:
        rows = rows[: args.rows]
    encoded = [encode_pair(tok, format_prompt(r), r["output"], args.max_length) for r in rows]
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
    print(f"proxy: {args.proxy or 'SmolLM2-135M-Instruct (offline GGUF)'}; LoRA r={args.rank} "
          f"alpha={args.alpha} on {args.targets} ({n_lora:,} trainable parameters)")
    print(f"loaded in {load_s:.1f} s; {len(rows)} rows, {tokens} tokens scored in {score_s:.2f} s "
          f"({tokens / max(score_s, 1e-9):.0f} tokens/s, one forward + one backward per batch)")
    order = sorted(range(len(rows)), key=lambda i: (-_key(norms[i]), i))
    print("\nper-example LoRA gradient norm (response loss), largest first:")
    for rank, i in enumerate(order, 1):
        r = rows[i]
        text = (r["instruction"] + " -> " + r["output"]).replace("\n", " ")
        print(f"{rank:3d}. {norms[i]:9.4f}  row {i:3d}  {text[:90]}")

    if args.check:
        from .baselines import loop_per_example_grad_norms

        k = min(args.check, len(encoded))
        ids, labels, mask = pad_batch(encoded[:k], tok.pad_token_id)
        want = loop_per_example_grad_norms(model, ids, labels, mask)
        got = torch.tensor(norms[:k], dtype=torch.float64)
        rel = ((got - want.double()).abs() / want.double().abs()).nan_to_num(0.0).max().item()
        print(f"\ncheck against the per-example autograd loop on {k} rows: "
              f"max relative difference {rel:.2e}")
        if rel > 1e-3:
            return 1
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for i, n in enumerate(norms):
                f.write(json.dumps({"index": i, "grad_norm": n}) + "\n")
    return 0


def _key(x: float) -> float:
    return float("-inf") if x != x else x


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="gradfilter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (
        ("demo", "per-example LoRA gradient norms of the shipped demo set on the offline proxy"),
        ("norms", "per-example LoRA gradient norms of an Alpaca JSON/JSONL file"),
    ):
        p = sub.add_parser(name, help=helptext)
        if name == "norms":
            p.add_argument("data", help="Alpaca-style JSON list or JSONL file")
            p.add_argument("-o", "--output", help="write {index, grad_norm} JSONL here")
        p.add_argument("--proxy", default=None,
                       help="hub id, local model folder or .gguf file (default: offline SmolLM2-135M)")
        p.add_argument("--rank", type=int, default=8)
        p.add_argument("--alpha", type=float, default=16)
        p.add_argument("--targets", default=DEFAULT_TARGETS)
        p.add_argument("--rows", type=int, default=0, help="score only the first N rows")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--max-length", type=int, default=256)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--init-b", type=float, default=0.02,
                       help="std of a random LoRA B init (0 keeps peft's zeros)")
        p.add_argument("--check", type=int, default=4 if name == "demo" else 0,
                       help="verify the first N rows against the per-example autograd loop")
        p.set_defaults(data=None, output=None)
    args = parser.parse_args(argv)
    return _norms(args)


if __name__ == "__main__":
    raise SystemExit(main())
