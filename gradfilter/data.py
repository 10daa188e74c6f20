"""Turning instruction rows into token ids with the prompt masked out.

An Alpaca-style row ``{instruction, input, output}`` becomes a prompt (the
instruction and, when present, the input, in :data:`PROMPT_TEMPLATE`) followed
by the response.  Labels are the token ids on the response and -100 on the
prompt, so the per-example loss is taken on the response only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass
class Encoded:
    """One tokenised example: ids and labels of equal length, prompt labels -100."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool


def format_prompt(row: dict[str, Any]) -> str:
    """The prompt text of an Alpaca-style row."""
    inp = row.get("input") or ""
    if inp.strip():
        return PROMPT_TEMPLATE_WITH_INPUT.format(instruction=row["instruction"], input=inp)
    return PROMPT_TEMPLATE.format(instruction=row["instruction"])


def encode_pair(tokenizer: Any, prompt: str, response: str, max_length: int) -> Encoded:
    """Tokenise ``prompt + response`` (plus EOS); loss only on the response.

    Truncation keeps the beginning: a prompt longer than ``max_length`` leaves
    no response token, which the caller sees as an example without supervised
    tokens.
    """
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        r = r + [tokenizer.eos_token_id]
    ids = p + r
    labels = [-100] * len(p) + r
    truncated = len(ids) > max_length
    return Encoded(ids[:max_length], labels[:max_length], truncated)


def pad_batch(
    examples: list[Encoded], pad_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack examples into ``input_ids, labels, attention_mask`` of shape ``[B, T]``."""
    if side not in ("right", "left"):
        raise ValueError(f"padding side must be 'right' or 'left', got {side!r}")
    seq = max((len(e.input_ids) for e in examples), default=0)
    bsz = len(examples)
    ids = torch.full((bsz, seq), pad_id, dtype=torch.long)
    labels = torch.full((bsz, seq), -100, dtype=torch.long)
    mask = torch.zeros((bsz, seq), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        sl = slice(0, n) if side == "right" else slice(seq - n, seq)
        ids[i, sl] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[i, sl] = torch.tensor(e.labels, dtype=torch.long)
        mask[i, sl] = 1
    return ids, labels, mask


def demo_rows() -> list[dict[str, str]]:
    """The small instruction set shipped with gradfilter (some pairs deliberately broken)."""
    text = resources.files("gradfilter").joinpath("resources/demo.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
