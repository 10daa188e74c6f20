"""The forward-only selectors of a run (loss, IFD, random) and the run summary."""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from typing import Any

import numpy as np
import torch

from gradfilter.run.loop import collate
from gradfilter.run.records import build_records


def pad_id_of(tok: Any) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def score_forward(config, model, tok, prepared, work, timings):
    t0 = time.perf_counter()
    values, counted = _forward_method(
        config, model, tok, prepared.rows, prepared.encoded, prepared.ok, work.snaps, pad_id_of(tok)
    )
    timings["scoring_s"] = time.perf_counter() - t0
    meta = prepared.meta()
    return build_records(meta, prepared.ok, config, values=values), counted, {}


def _response_text(row: Any) -> str:
    if row.kind == "chat":
        return "\n".join(m["content"] for m in row.messages or [] if m.get("role") == "assistant")
    return row.output


def _forward_method(config, model, tok, rows, encoded, ok, snaps, pad_id):
    """Scores of the forward-only baselines: ``(values over ok rows, token counts)``."""
    from gradfilter.io.data import encode_pair
    from gradfilter.method.selectors import example_losses, ifd_from_losses, random_scores

    counted = {"tokens": 0, "padded": 0, "seconds": 0.0}
    if config.method == "random":
        return {"random": random_scores(len(ok), config.seed)}, counted
    model.eval()

    def losses(encs: list[Any]) -> np.ndarray:
        out = np.full(len(ok), np.nan)
        t = time.perf_counter()
        for idx in snaps:
            ids, labels, mask = collate(encs, idx, pad_id)
            out[idx] = example_losses(model, ids, labels, mask).double().numpy()
            counted["tokens"] += int(mask.sum())
            counted["padded"] += int(mask.numel() - mask.sum())
        counted["seconds"] += time.perf_counter() - t
        return out

    cond = losses([encoded[i] for i in ok])
    if config.method == "loss":
        return {"loss": cond}, counted
    alone_enc = [encode_pair(tok, "", _response_text(rows[i]), config.max_length) for i in ok]
    alone = losses(alone_enc)
    values = {
        "cond_loss": cond,
        "alone_loss": alone,
        "ifd": ifd_from_losses(cond, alone, "loss_ratio"),
        "ifd_ppl": ifd_from_losses(cond, alone, "ppl_ratio"),
    }
    return values, counted


def _versions() -> dict[str, str]:
    import peft
    import transformers

    from gradfilter import __version__

    return {
        "gradfilter": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def run_summary(config, source, plan, timings, counted, model) -> dict[str, Any]:
    total_tokens = counted["tokens"] + counted["padded"]
    return {
        "config": dataclasses.asdict(config),
        "versions": _versions(),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(next(model.parameters()).device),
        },
        "seed": config.seed,
        "method": config.method,
        "source": {"kind": getattr(source, "kind", None), "path": getattr(source, "path", None)},
        "plan": plan,
        "timings": timings,
        "tokens_processed": counted["tokens"],
        "tokens_per_second": counted["tokens"] / max(1e-9, counted["seconds"]),
        "padding_fraction": counted["padded"] / max(1, total_tokens),
    }
