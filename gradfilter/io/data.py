"""Turning instruction rows into token ids with the prompt masked out.

An Alpaca-style row ``{instruction, input, output}`` becomes a prompt (the
instruction and, when present, the input, in :data:`PROMPT_TEMPLATE`) followed
by the response.  Labels are the token ids on the response and -100 on the
prompt, so the per-example loss is taken on the response only.

A chat row (``messages``, see :mod:`gradfilter.io.rows`) is rendered with the
tokenizer's chat template; labels are kept on the assistant turns only.
:func:`encode_row` handles both kinds of :class:`~gradfilter.io.rows.Row`.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from gradfilter.io.rows import Row

IGNORE_INDEX = -100

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_TEMPLATE_WITH_INPUT = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


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
        ids[i, sl] = torch.as_tensor(e.input_ids, dtype=torch.long)
        labels[i, sl] = torch.as_tensor(e.labels, dtype=torch.long)
        mask[i, sl] = 1
    return ids, labels, mask


def demo_rows() -> list[dict[str, str]]:
    """The small instruction set shipped with gradfilter (some pairs deliberately broken)."""
    text = resources.files("gradfilter").joinpath("resources/demo.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- rows


@dataclass
class EncodedRow(Encoded):
    """A tokenised :class:`~gradfilter.io.rows.Row`; usable wherever :class:`Encoded` is.

    Attributes:
        n_tokens: length of the full (untruncated) token sequence.
        n_response_tokens: number of supervised tokens (labels != -100) kept
            after truncation to ``max_length``.
    """

    n_tokens: int
    n_response_tokens: int


_PLACEHOLDER = re.compile(r"\{(instruction|input)\}")


def render_prompt(instruction: str, input: str = "", template: str | None = None) -> str:
    """The prompt text for an instruction and optional input.

    With ``template=None`` this is :func:`format_prompt`. A custom template is
    plain text in which only ``{instruction}`` and ``{input}`` are replaced
    (other braces are kept literally). A template without ``{input}`` gets a
    non-empty input appended to the instruction after a blank line.

    Raises:
        ValueError: the template has no ``{instruction}`` placeholder.
    """
    if template is None:
        return format_prompt({"instruction": instruction, "input": input})
    if "{instruction}" not in template:
        raise ValueError("a prompt template must contain the placeholder {instruction}")
    if "{input}" not in template and input.strip():
        instruction = f"{instruction}\n\n{input}"
    values = {"instruction": instruction, "input": input}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _finish(ids: list[int], labels: list[int], max_length: int) -> EncodedRow:
    """Truncate to ``max_length`` (keeping the start) and count supervised tokens."""
    n = len(ids)
    ids, labels = ids[:max_length], labels[:max_length]
    n_resp = sum(1 for x in labels if x != IGNORE_INDEX)
    return EncodedRow(ids, labels, n > max_length, n, n_resp)


def _tokens(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without added special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer: Any, messages: Sequence[dict[str, Any]], generation: bool) -> str:
    """The chat template's text for ``messages``."""
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation
    )
    if not isinstance(text, str):
        raise ValueError("the chat template did not render to text")  # noqa: TRY004
    return text


def _try_render(tokenizer: Any, messages: Sequence[dict[str, Any]], generation: bool) -> str | None:
    """:func:`_render`, or ``None`` when the template rejects the partial conversation."""
    try:
        return _render(tokenizer, messages, generation)
    except Exception:  # noqa: BLE001 - templates raise anything (jinja errors, ValueError, ...)
        return None


def _special_strings(tokenizer: Any) -> list[str]:
    """Special-token strings, longest first (to find an end-of-turn marker)."""
    found: set[str] = set()
    for tok in getattr(tokenizer, "all_special_tokens", None) or []:
        if isinstance(tok, str) and tok:
            found.add(tok)
    eos = getattr(tokenizer, "eos_token", None)
    if isinstance(eos, str) and eos:
        found.add(eos)
    return sorted(found, key=len, reverse=True)


def _assistant_char_spans(
    tokenizer: Any, messages: list[dict[str, Any]], full: str
) -> list[tuple[int, int]]:
    """Character spans of ``full`` that the assistant turns produce.

    Each span starts after the assistant header (the text that
    ``add_generation_prompt=True`` adds) and ends after the turn's content and
    its end-of-turn marker (trailing whitespace excluded). Boundaries come from
    rendering the conversation before and through each assistant turn and
    checking that those renderings are prefixes of ``full``; where they are
    not, the turn's content is searched for in the text instead.
    """
    specials = _special_strings(tokenizer)
    spans: list[tuple[int, int]] = []
    cursor = 0
    lost: list[int] = []
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        content = msg.get("content") or ""
        start: int | None = None
        header_known = False
        if i > 0:
            for generation in (True, False):
                before = _try_render(tokenizer, messages[:i], generation)
                if before is not None and full.startswith(before) and len(before) >= cursor:
                    start, header_known = len(before), generation
                    break
        through = _try_render(tokenizer, messages[: i + 1], False)
        stop = len(through) if through is not None and full.startswith(through) else None
        lo = start if start is not None else cursor
        hi = stop if stop is not None and stop >= lo else len(full)
        pos = full.find(content, lo, hi) if content else -1
        if pos < 0 and content:
            pos = full.find(content.strip(), lo, hi) if content.strip() else -1
            c_len = len(content.strip())
        else:
            c_len = len(content)
        if pos >= 0:
            c_end = pos + c_len
            if stop is not None:
                tail = full[c_end:stop]
                end = c_end + len(tail.rstrip())
            else:
                end = c_end
                for sp in specials:
                    if full.startswith(sp, c_end):
                        end = c_end + len(sp)
                        break
            begin = lo if header_known else pos
        elif stop is not None and start is not None:
            # Content rewritten by the template: supervise the whole turn text.
            begin = start
            end = start + len(full[start:stop].rstrip())
        elif not content and start is not None and header_known:
            # Empty assistant turn after a known header: supervise its end marker.
            begin = start
            end = start
            for sp in specials:
                if full.startswith(sp, start):
                    end = start + len(sp)
                    break
        else:
            lost.append(i)
            continue
        if end > begin:
            spans.append((begin, end))
        cursor = max(cursor, end)
    if lost:
        if not spans:
            raise ValueError(
                "could not locate any assistant turn in the text rendered by the chat template"
            )
        warnings.warn(
            f"could not locate assistant turn(s) {lost} in the rendered chat; "
            "they are not supervised",
            stacklevel=3,
        )
    return spans


def _token_boundary(tokenizer: Any, full: str, full_ids: list[int], char_pos: int) -> int:
    """Number of tokens of ``full`` that make up ``full[:char_pos]``.

    The prefix is tokenised on its own; when its tokens are a prefix of
    ``full_ids`` the boundary is exact. Otherwise a token straddles
    ``char_pos`` and the length of the common prefix is used.
    """
    if char_pos <= 0:
        return 0
    if char_pos >= len(full):
        return len(full_ids)
    prefix = _tokens(tokenizer, full[:char_pos])
    n = len(prefix)
    if prefix == full_ids[:n]:
        return n
    k = 0
    for a, b in zip(prefix, full_ids, strict=False):
        if a != b:
            break
        k += 1
    return k


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, Any]], max_length: int) -> EncodedRow:
    """Tokenise a conversation with the tokenizer's chat template.

    Labels are the token ids of the assistant turns (content plus end-of-turn
    marker) and -100 elsewhere. Messages after the last assistant turn are
    dropped (they cannot affect the loss of a causal model).

    Raises:
        ValueError: the tokenizer has no chat template, the template fails on
            the conversation, or no assistant turn can be located.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer ({type(tokenizer).__name__}) has no chat template, so chat rows "
            "('messages') cannot be tokenised; use a tokenizer with a chat template or "
            "Alpaca-style rows"
        )
    msgs = [dict(m) for m in messages]
    last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=-1)
    if last < 0:
        raise ValueError("the conversation has no assistant turn")
    msgs = msgs[: last + 1]
    try:
        full = _render(tokenizer, msgs, False)
    except Exception as e:
        raise ValueError(f"the chat template failed on this conversation: {e}") from e
    full_ids = _tokens(tokenizer, full)
    labels = [IGNORE_INDEX] * len(full_ids)
    for begin, end in _assistant_char_spans(tokenizer, msgs, full):
        t0 = _token_boundary(tokenizer, full, full_ids, begin)
        t1 = _token_boundary(tokenizer, full, full_ids, end)
        labels[t0:t1] = full_ids[t0:t1]
    return _finish(full_ids, labels, max_length)


def encode_row(
    row: Row, tokenizer: Any, max_length: int, template: str | None = None
) -> EncodedRow:
    """Tokenise a usable :class:`~gradfilter.io.rows.Row`, loss on the response only.

    Alpaca rows: prompt from :func:`render_prompt` (``template`` or the default
    Alpaca prompt), then the output and EOS, as in :func:`encode_pair`. Chat
    rows: :func:`encode_chat` (``template`` is not used).

    The sequence keeps its first ``max_length`` tokens; ``truncated`` says
    whether anything was cut, ``n_tokens`` is the untruncated length and
    ``n_response_tokens`` the number of supervised tokens kept (0 when the
    prompt alone fills ``max_length``).

    Raises:
        ValueError: the row's status is not ``"ok"``, ``max_length < 1``, or a
            chat row cannot be rendered (e.g. no chat template).
    """
    if row.status != "ok":
        raise ValueError(f"row {row.index} (id {row.id}) cannot be encoded: {row.status}")
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    if row.kind == "chat":
        if row.messages is None:
            raise ValueError(f"row {row.index} (id {row.id}) has no messages")
        return encode_chat(tokenizer, row.messages, max_length)
    if row.kind != "alpaca" or row.instruction is None or row.output is None:
        raise ValueError(f"row {row.index} (id {row.id}) is not an instruction row")
    prompt = render_prompt(row.instruction, row.input or "", template)
    full = encode_pair(tokenizer, prompt, row.output, sys.maxsize)
    return _finish(full.input_ids, full.labels, max_length)


def _encode_alpaca_batch(
    rows: Sequence[Row],
    tokenizer: Any,
    max_length: int,
    template: str | None,
    size: int = 1024,
    small: bool = False,
) -> dict[int, EncodedRow]:
    """:func:`encode_row` of the usable Alpaca rows, by position, with one tokenizer
    call per ``size`` prompts and one per ``size`` responses (the same ids as one
    call per text, several times faster); {} when the tokenizer takes no batch,
    and rows of a batch that fails are left to :func:`encode_row`."""
    todo = [
        i
        for i, r in enumerate(rows)
        if r.status == "ok" and r.kind == "alpaca" and r.instruction is not None
        and r.output is not None
    ]  # fmt: skip
    out: dict[int, EncodedRow] = {}
    eos = getattr(tokenizer, "eos_token_id", None)
    for start in range(0, len(todo), size):
        part = todo[start : start + size]
        prompts = [render_prompt(rows[i].instruction, rows[i].input or "", template) for i in part]
        try:
            p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
            r_ids = tokenizer([rows[i].output for i in part], add_special_tokens=False)["input_ids"]
        except Exception:  # noqa: BLE001 - the row-by-row path reports each row's error
            continue
        if len(p_ids) != len(part) or len(r_ids) != len(part):
            continue
        for i, p, r in zip(part, p_ids, r_ids, strict=True):
            p, r = list(p), list(r)
            if eos is not None:
                r = r + [eos]
            enc = _finish(p + r, [IGNORE_INDEX] * len(p) + r, max_length)
            out[i] = compact(enc) if small else enc
    return out


def compact(enc: EncodedRow) -> EncodedRow:
    """The row with its ids and labels as int32 NumPy arrays: 8 bytes a token
    instead of a Python list's 40 or more (a run keeps every row's tokens); a
    compact row is returned as it is."""
    if isinstance(enc.input_ids, np.ndarray):
        return enc
    return EncodedRow(
        np.asarray(enc.input_ids, dtype=np.int32),
        np.asarray(enc.labels, dtype=np.int32),
        enc.truncated,
        enc.n_tokens,
        enc.n_response_tokens,
    )


def encode_rows(
    rows: Sequence[Row],
    tokenizer: Any,
    max_length: int,
    template: str | None = None,
    small: bool = False,
) -> tuple[list[EncodedRow | None], list[str]]:
    """Encode every row that can be encoded, with a status for each.

    Returns:
        ``(encoded, statuses)``, both one entry per row. ``encoded[i]`` is
        ``None`` where ``statuses[i] != "ok"``: the row's own status when it was
        not usable, ``"encoding failed: ..."`` when tokenisation raised (e.g. no
        chat template), or ``"no response tokens within max_length N"`` when
        truncation cut the whole response.  ``small``: each row :func:`compact` as
        soon as it is encoded (what a run keeps).
    """
    if template is not None:
        render_prompt("", "", template)  # validate once, before the loop
    ready = (
        _encode_alpaca_batch(rows, tokenizer, max_length, template, small=small)
        if max_length >= 1
        else {}
    )
    encoded: list[EncodedRow | None] = []
    statuses: list[str] = []
    for i, row in enumerate(rows):
        if row.status != "ok":
            encoded.append(None)
            statuses.append(row.status)
            continue
        try:
            enc = ready.pop(i) if i in ready else encode_row(row, tokenizer, max_length, template)
        except ValueError as e:
            encoded.append(None)
            statuses.append(f"encoding failed: {e}")
            continue
        if enc.n_response_tokens == 0:
            encoded.append(None)
            statuses.append(f"no response tokens within max_length {max_length}")
            continue
        encoded.append(compact(enc) if small else enc)
        statuses.append("ok")
    return encoded, statuses
