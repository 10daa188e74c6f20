"""Reading instruction data into :class:`Row` objects and writing subsets back.

Accepted inputs (see :func:`load_rows`):

* an Alpaca-style JSON file holding a list of objects ``{instruction, input, output}``;
* a JSON Lines file (``.jsonl`` / ``.ndjson``, or a ``.json`` file whose content
  is one object per line) of Alpaca rows or chat rows ``{"messages": [{role, content}, ...]}``;
* a Parquet file;
* a folder written by ``datasets.Dataset.save_to_disk``;
* from Python, a list of dicts or a ``datasets.Dataset``.

Every input row becomes exactly one :class:`Row`, in input order, whether or not
it is usable: a problem (missing or non-string field, empty response, a JSON
Lines line that is not valid JSON, ...) is recorded in :attr:`Row.status`
instead of raising.  Blank lines of a JSON Lines file are not rows.

:func:`write_subset` writes a selection of rows back in the input's own format:
a JSON list as a JSON list of the original records, JSON Lines as the original
lines byte for byte, Parquet as Parquet, a saved dataset as a saved dataset;
Python inputs get the selected records (or ``Dataset.select(...)``) returned.
The readers and writers of each file format are in :mod:`gradfilter.io.formats`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradfilter.io import formats
from gradfilter.io.formats import ACCEPTED_FORMATS, FILE_FORMATS, sniff_format, type_name

__all__ = [
    "ACCEPTED_FORMATS",
    "DEFAULT_FIELDS",
    "OK",
    "Row",
    "Source",
    "content_hash",
    "iter_rows",
    "load_rows",
    "sniff_format",
    "write_subset",
]

#: Status of a usable row.
OK = "ok"

#: Canonical field name -> field name in the data, when no mapping is given.
DEFAULT_FIELDS: dict[str, str] = {
    "instruction": "instruction",
    "input": "input",
    "output": "output",
    "messages": "messages",
    "id": "id",
}


@dataclass
class Row:
    """One input row, usable or not.

    Attributes:
        index: 0-based position of the row in the input.
        id: the row's own id (the mapped ``id`` field, as a string) or, when it
            has none, the first 16 hex digits of :func:`content_hash`.
        kind: ``"alpaca"``, ``"chat"`` or ``"invalid"`` (not an object at all,
            e.g. a JSON Lines line that is not valid JSON).
        instruction: the instruction text (Alpaca rows; ``None`` when missing or
            not a string).
        input: the optional input text (Alpaca rows; ``""`` when absent).
        output: the response text (Alpaca rows).
        messages: the conversation (chat rows): a list of ``{role, content}`` dicts.
        status: ``"ok"`` or a short reason why the row cannot be used.
        record: the original record (a dict for valid rows; for a JSON Lines line
            that is not valid JSON, the raw line text; otherwise whatever the
            input held at that position).
    """

    index: int
    id: str
    kind: str
    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    messages: list[dict[str, Any]] | None = None
    status: str = OK
    record: Any = None

    @property
    def ok(self) -> bool:
        """Whether the row is usable (``status == "ok"``)."""
        return self.status == OK


@dataclass
class Source:
    """Where rows came from, with what :func:`write_subset` needs to write a subset.

    Attributes:
        kind: ``"json"``, ``"jsonl"``, ``"parquet"``, ``"hf_dataset"``,
            ``"records"`` (a Python list of dicts) or ``"dataset"`` (a
            ``datasets.Dataset`` object).
        path: the input path (``None`` for Python inputs).
        fields: the resolved field mapping, canonical name -> name in the data.
        n_rows: number of rows read.
        lines: for JSON Lines, the raw bytes of each row's line (without the
            ``\\n``), for verbatim output.
        records: for JSON lists and Python lists, the original records.
        table: for Parquet, the ``pyarrow.Table`` read.
        dataset: for saved datasets and ``Dataset`` inputs, the ``Dataset``.
    """

    kind: str
    path: str | None
    fields: dict[str, str]
    n_rows: int = 0
    lines: list[bytes] | None = field(default=None, repr=False)
    records: list[Any] | None = field(default=None, repr=False)
    table: Any = field(default=None, repr=False)
    dataset: Any = field(default=None, repr=False)


# ----------------------------------------------------------------------------- helpers


def _canonical_json(value: Any) -> str:
    """Deterministic JSON text: sorted keys, no whitespace, non-ASCII kept."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def content_hash(value: Any) -> str:
    """First 16 hex digits of the SHA-256 of the canonical JSON of ``value``."""
    return hashlib.sha256(_canonical_json(value).encode("utf-8")).hexdigest()[:16]


def _resolve_fields(fields: Mapping[str, str] | None) -> dict[str, str]:
    """Merge a user field mapping into :data:`DEFAULT_FIELDS`, validating it."""
    resolved = dict(DEFAULT_FIELDS)
    if fields is None:
        return resolved
    if not isinstance(fields, Mapping):
        raise TypeError(f"fields must be a dict of canonical name -> column name, got {fields!r}")
    for key, name in fields.items():
        if key not in DEFAULT_FIELDS:
            raise ValueError(
                f"unknown field {key!r} in the field mapping; known fields: "
                f"{', '.join(DEFAULT_FIELDS)}"
            )
        if not isinstance(name, str) or not name:
            raise ValueError(f"field mapping for {key!r} must be a non-empty string, got {name!r}")
        resolved[key] = name
    return resolved


def _row_id(record: Mapping[str, Any], fields: Mapping[str, str], text: Any) -> str:
    """The record's own id when present, else the content hash of ``text``."""
    own = record.get(fields["id"])
    if own is not None:
        if isinstance(own, str):
            return own
        if isinstance(own, int) and not isinstance(own, bool):
            return str(own)
        return _canonical_json(own) if isinstance(own, (Mapping, list, tuple)) else str(own)
    return content_hash(text)


def _messages_status(messages: Any, name: str) -> str:
    """Status of a chat conversation (``"ok"`` or the first problem found)."""
    if not isinstance(messages, (list, tuple)):
        return f"field '{name}' is not a list (got {type_name(messages)})"
    if not messages:
        return f"field '{name}' is empty"
    n_assistant = 0
    has_content = False
    for i, msg in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(msg, Mapping):
            return f"{where} is not an object (got {type_name(msg)})"
        for key in ("role", "content"):
            if key not in msg:
                return f"{where} has no '{key}'"
            if not isinstance(msg[key], str):
                return f"{where}.{key} is not a string (got {type_name(msg[key])})"
        if msg["role"] == "assistant":
            n_assistant += 1
            has_content = has_content or bool(msg["content"].strip())
    if n_assistant == 0:
        return "no assistant turn"
    if not has_content:
        return "empty response"
    return OK


def _make_row(index: int, record: Any, fields: Mapping[str, str]) -> Row:
    """Classify and validate one record (any Python value)."""
    if not isinstance(record, Mapping):
        return Row(
            index=index,
            id=content_hash({"record": record}),
            kind="invalid",
            status=f"row is not an object (got {type_name(record)})",
            record=record,
        )
    messages_name = fields["messages"]
    messages = record.get(messages_name)
    if messages is not None:
        status = _messages_status(messages, messages_name)
        ok_messages = (
            [dict(m) for m in messages] if status == OK or _is_message_list(messages) else None
        )
        return Row(
            index=index,
            id=_row_id(record, fields, {"messages": messages}),
            kind="chat",
            messages=ok_messages,
            status=status,
            record=record,
        )

    values: dict[str, Any] = {}
    status = OK
    for key in ("instruction", "input", "output"):
        name = fields[key]
        value = record.get(name)
        if value is None:
            if key == "input":
                value = ""
            elif status == OK:
                status = f"missing field '{name}'"
        elif not isinstance(value, str) and status == OK:
            status = f"field '{name}' is not a string (got {type_name(value)})"
        values[key] = value
    if status == OK and not values["output"].strip():
        status = "empty response"
    return Row(
        index=index,
        id=_row_id(record, fields, values),
        kind="alpaca",
        instruction=values["instruction"] if isinstance(values["instruction"], str) else None,
        input=values["input"] if isinstance(values["input"], str) else None,
        output=values["output"] if isinstance(values["output"], str) else None,
        status=status,
        record=record,
    )


def _is_message_list(messages: Any) -> bool:
    return isinstance(messages, (list, tuple)) and all(isinstance(m, Mapping) for m in messages)


# ----------------------------------------------------------------------------- loading


def _jsonl_row(index: int, lineno: int, raw: bytes, fields: dict[str, str]) -> Row:
    """Row of one non-blank JSON Lines line (``lineno`` is 1-based)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        return Row(
            index=index,
            id=content_hash({"line": text}),
            kind="invalid",
            status=f"line {lineno} is not valid UTF-8",
            record=text,
        )
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return Row(
            index=index,
            id=content_hash({"line": text}),
            kind="invalid",
            status=f"invalid JSON on line {lineno} (column {e.colno}: {e.msg})",
            record=text,
        )
    row = _make_row(index, record, fields)
    if row.kind == "invalid":
        row.status = f"line {lineno}: {row.status}"
    return row


def _is_hf_dataset_object(obj: Any) -> bool:
    module = type(obj).__module__ or ""
    return module.startswith("datasets")


def _checked_kind(path: Path, format: str) -> str:
    """The format of ``path`` (sniffed for ``"auto"``), checked against what it is."""
    if format not in ("auto", *FILE_FORMATS):
        raise ValueError(
            f"unknown format {format!r}; use 'auto' or one of {', '.join(FILE_FORMATS)}"
        )
    if not path.exists():
        raise FileNotFoundError(f"data path {str(path)!r} does not exist")
    kind = sniff_format(path) if format == "auto" else format
    if kind == "hf_dataset" and not path.is_dir():
        raise ValueError(f"{str(path)!r} is a file; a saved Hugging Face dataset is a folder")
    if kind != "hf_dataset" and path.is_dir():
        raise ValueError(
            f"{str(path)!r} is a folder; format {kind!r} needs a file. "
            f"Accepted formats: {ACCEPTED_FORMATS}."
        )
    return kind


def _load_path(path: Path, format: str, fields: dict[str, str]) -> tuple[list[Row], Source]:
    """:func:`load_rows` for a file or a saved-dataset folder."""
    kind = _checked_kind(path, format)
    if kind == "jsonl":
        lines = formats.read_jsonl_lines(path)
        rows = [_jsonl_row(i, lineno, raw, fields) for i, (lineno, raw) in enumerate(lines)]
        return rows, Source("jsonl", str(path), fields, len(rows), lines=[raw for _, raw in lines])
    extra: dict[str, Any]
    if kind == "json":
        records = formats.read_json(path)
        extra = {"records": records}
    elif kind == "parquet":
        table = formats.read_parquet(path)
        records = table.to_pylist()
        extra = {"table": table}
    else:
        dataset = formats.read_hf_dataset(path)
        records = dataset.to_list()
        extra = {"dataset": dataset}
    rows = [_make_row(i, rec, fields) for i, rec in enumerate(records)]
    return rows, Source(kind, str(path), fields, len(rows), **extra)


def load_rows(
    source: Any,
    *,
    fields: Mapping[str, str] | None = None,
    format: str = "auto",
) -> tuple[list[Row], Source]:
    """Read instruction rows from a file, a saved dataset, or Python objects.

    Args:
        source: a path (``str`` or ``os.PathLike``) to a ``.json``, ``.jsonl``,
            ``.parquet`` file or a ``save_to_disk`` folder; a list of dicts; or
            a ``datasets.Dataset``.
        fields: maps canonical field names (``instruction``, ``input``,
            ``output``, ``messages``, ``id``) to the names used in the data,
            e.g. ``{"instruction": "question", "output": "answer"}``. Unmapped
            names keep their defaults.
        format: ``"auto"`` (detect with :func:`sniff_format`), ``"json"``,
            ``"jsonl"``, ``"parquet"`` or ``"hf_dataset"``; ignored for Python
            inputs.

    Returns:
        ``(rows, source)``: one :class:`Row` per input row, in input order, and
        the :class:`Source` that :func:`write_subset` needs.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: unknown or unreadable format, or a bad field mapping.
        TypeError: ``source`` is neither a path nor rows.
    """
    resolved = _resolve_fields(fields)
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source), format, resolved)
    if _is_hf_dataset_object(source):
        formats.check_dataset(source, "the given dataset")
        records = source.to_list()
        rows = [_make_row(i, rec, resolved) for i, rec in enumerate(records)]
        return rows, Source("dataset", None, resolved, len(rows), dataset=source)
    if hasattr(source, "columns") and hasattr(source, "to_dict"):
        raise TypeError(
            "load_rows does not take a DataFrame; pass df.to_dict('records') or save it as Parquet"
        )
    if isinstance(source, (Mapping, bytes, bytearray)):
        raise TypeError(
            f"load_rows expects a path, a list of row dicts or a datasets.Dataset, "
            f"got {type(source).__name__}"
        )
    if isinstance(source, Sequence) or hasattr(source, "__iter__"):
        records = list(source)
        rows = [_make_row(i, rec, resolved) for i, rec in enumerate(records)]
        return rows, Source("records", None, resolved, len(rows), records=records)
    raise TypeError(
        f"load_rows expects a path, a list of row dicts or a datasets.Dataset, "
        f"got {type(source).__name__}"
    )


def iter_rows(
    source: Any,
    *,
    fields: Mapping[str, str] | None = None,
    format: str = "auto",
    batch_rows: int = 4096,
) -> Iterator[Row]:
    """The rows of :func:`load_rows`, one at a time, without holding the input:
    JSON Lines is read line by line, Parquet and saved datasets ``batch_rows``
    rows at a time, Python inputs item by item.  A JSON file holding one list
    is parsed whole (convert it to JSON Lines or Parquet for a corpus larger
    than memory).  Rows, indices, ids and statuses equal :func:`load_rows`'s."""
    resolved = _resolve_fields(fields)
    if not isinstance(source, (str, os.PathLike)):
        if _is_hf_dataset_object(source):
            formats.check_dataset(source, "the given dataset")
            yield from _iter_dataset(source, resolved, batch_rows)
            return
        if (
            isinstance(source, (Mapping, bytes, bytearray))
            or hasattr(source, "columns")
            or not hasattr(source, "__iter__")
        ):
            load_rows(source, fields=fields)  # raises its TypeError for these
        for i, rec in enumerate(source):
            yield _make_row(i, rec, resolved)
        return
    path = Path(source)
    kind = _checked_kind(path, format)
    if kind == "jsonl":
        for index, lineno, raw in jsonl_lines(path):
            yield _jsonl_row(index, lineno, raw, resolved)
    elif kind == "parquet":
        import pyarrow.parquet as pq

        index = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
            for rec in batch.to_pylist():
                yield _make_row(index, rec, resolved)
                index += 1
    elif kind == "hf_dataset":
        yield from _iter_dataset(formats.read_hf_dataset(path), resolved, batch_rows)
    else:
        for i, rec in enumerate(formats.read_json(path)):
            yield _make_row(i, rec, resolved)


def jsonl_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, int, bytes]]:
    """``(row index, line number, raw line)`` of each row of a JSON Lines file, a
    line at a time: blank lines are no rows, a leading BOM is dropped."""
    with open(path, "rb") as f:
        index = 0
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            raw = raw.rstrip(b"\n")
            if raw.strip():
                yield index, lineno, raw
                index += 1


def _iter_dataset(dataset: Any, fields: dict[str, str], batch_rows: int) -> Iterator[Row]:
    """Rows of a ``datasets.Dataset``, ``batch_rows`` at a time (columns to records)."""
    index = 0
    for start in range(0, len(dataset), batch_rows):
        columns = dataset[start : start + batch_rows]
        names = list(columns)
        for i in range(len(columns[names[0]]) if names else 0):
            yield _make_row(index, {k: columns[k][i] for k in names}, fields)
            index += 1


# ----------------------------------------------------------------------------- writing


def _ordered_indices(indices: Sequence[int], n_rows: int, order: str) -> list[int]:
    if order not in ("input", "rank"):
        raise ValueError(f"order must be 'input' or 'rank', got {order!r}")
    out: list[int] = []
    seen: set[int] = set()
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int):
            try:
                j = int(i)  # numpy integers
            except (TypeError, ValueError):
                raise TypeError(f"row indices must be integers, got {i!r}") from None
            if j != i:
                raise TypeError(f"row indices must be integers, got {i!r}")
            i = j
        if not 0 <= i < n_rows:
            raise IndexError(f"row index {i} out of range for {n_rows} rows")
        if i in seen:
            raise ValueError(f"row index {i} selected more than once")
        seen.add(i)
        out.append(i)
    return sorted(out) if order == "input" else out


def _prepare_out(out_path: str | os.PathLike[str] | None, source: Source) -> Path:
    if out_path is None:
        raise ValueError(f"an output path is needed to write a subset of a {source.kind} input")
    out = Path(out_path)
    if source.path is not None and out.resolve() == Path(source.path).resolve():
        raise ValueError(f"refusing to overwrite the input {source.path!r} with a subset")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def write_subset(
    rows: Sequence[Row],
    source: Source,
    indices: Sequence[int],
    out_path: str | os.PathLike[str] | None = None,
    order: str = "input",
) -> Any:
    """Write the rows at ``indices`` in the input's own format.

    Args:
        rows: the rows returned by :func:`load_rows` together with ``source``.
        source: the :class:`Source` returned by :func:`load_rows`.
        indices: row indices (:attr:`Row.index`) to keep; each at most once.
        out_path: output file (or folder, for saved datasets); required for
            file inputs, ignored for Python inputs.
        order: ``"input"`` writes rows in input order, ``"rank"`` in the order
            of ``indices``.

    Returns:
        The path written (``str``) for file inputs; the list of selected
        records for a list input; ``dataset.select(...)`` for a ``Dataset`` input.

    The records are written unchanged: a JSON list as ``json.dump(...,
    ensure_ascii=False, indent=2)`` of the original objects, JSON Lines as the
    original lines byte for byte, Parquet via ``Table.take`` (schema kept), a
    saved dataset via ``Dataset.select(...).save_to_disk``.
    """
    if len(rows) != source.n_rows:
        raise ValueError(
            f"got {len(rows)} rows but the source holds {source.n_rows}; pass the rows "
            "returned by load_rows together with their source"
        )
    idx = _ordered_indices(indices, source.n_rows, order)
    kind = source.kind
    if kind == "records":
        assert source.records is not None
        return [source.records[i] for i in idx]
    if kind == "dataset":
        return source.dataset.select(idx)
    out = _prepare_out(out_path, source)
    if kind == "json":
        assert source.records is not None
        formats.write_json(out, source.records, idx)
    elif kind == "jsonl":
        assert source.lines is not None
        formats.write_jsonl(out, source.lines, idx)
    elif kind == "parquet":
        formats.write_parquet(out, source.table, idx)
    elif kind == "hf_dataset":
        formats.write_hf_dataset(out, source.dataset, idx)
    else:
        raise ValueError(f"unknown source kind {kind!r}")
    return str(out)
