"""Readers and writers of each on-disk input format, and format detection.

The formats are an Alpaca-style JSON list, JSON Lines, Parquet, and a folder
written by ``datasets.Dataset.save_to_disk`` (see :func:`sniff_format`).  The
readers return the raw records (or, for JSON Lines, the raw lines) without
interpreting them; :mod:`gradfilter.io.rows` turns them into rows.  The writers
write a selection of the records back in the same format, unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ACCEPTED_FORMATS",
    "FILE_FORMATS",
    "check_dataset",
    "read_hf_dataset",
    "read_json",
    "read_jsonl_lines",
    "read_parquet",
    "sniff_format",
    "type_name",
    "write_hf_dataset",
    "write_json",
    "write_jsonl",
    "write_parquet",
]

#: Human-readable list of the accepted input formats (used in error messages).
ACCEPTED_FORMATS = (
    "an Alpaca JSON file holding a list of objects (.json), JSON Lines (.jsonl, .ndjson), "
    "Parquet (.parquet, .pq), or a folder written by datasets.Dataset.save_to_disk "
    "(containing dataset_info.json / state.json)"
)

#: The file formats :func:`sniff_format` can report.
FILE_FORMATS = ("json", "jsonl", "parquet", "hf_dataset")
_JSONL_EXTENSIONS = (".jsonl", ".ndjson")
_PARQUET_EXTENSIONS = (".parquet", ".pq")


def type_name(value: Any) -> str:
    """JSON-style name of a value's type, for status messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


# ----------------------------------------------------------------------------- sniffing


def _first_line(path: Path, limit: int = 1 << 26) -> bytes:
    """The first non-blank line of a file (at most ``limit`` bytes), BOM removed."""
    with open(path, "rb") as f:
        read = 0
        while read < limit:
            line = f.readline(limit - read)
            if not line:
                return b""
            read += len(line)
            if read == len(line) and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if line.strip():
                return line.strip()
    return b""


def _sniff_folder(p: Path) -> str:
    """Format of a folder: a saved Hugging Face dataset, or an error."""
    if any((p / name).is_file() for name in ("dataset_info.json", "state.json")):
        return "hf_dataset"
    if (p / "dataset_dict.json").is_file():
        return "hf_dataset"
    raise ValueError(
        f"{str(p)!r} is a folder but not a saved Hugging Face dataset (no dataset_info.json "
        f"or state.json). Accepted formats: {ACCEPTED_FORMATS}."
    )


def _sniff_object_file(p: Path, first: bytes) -> str:
    """Format of a file whose first line starts with ``{``: JSON Lines or one JSON object."""
    try:
        obj = json.loads(first.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        obj = None
    if isinstance(obj, dict):
        return "jsonl"
    # Either one pretty-printed object (which the JSON reader rejects with a
    # clear message) or JSON Lines whose first line is broken.
    try:
        json.loads(p.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "jsonl"
    return "json"


def sniff_format(path: str | os.PathLike[str]) -> str:
    """Detect the format of a data path: ``"json"``, ``"jsonl"``, ``"parquet"`` or ``"hf_dataset"``.

    A folder holding ``dataset_info.json``, ``state.json`` or ``dataset_dict.json``
    is a saved Hugging Face dataset. A file is recognised by its extension
    (``.jsonl``/``.ndjson``, ``.parquet``/``.pq``) or by its content: the
    Parquet magic bytes, a JSON list (first character ``[``), or one JSON object
    per line (first line alone is a JSON object). A ``.json`` file whose first
    line is a complete object is JSON Lines.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the format cannot be recognised.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data path {str(p)!r} does not exist")
    if p.is_dir():
        return _sniff_folder(p)
    ext = p.suffix.lower()
    if ext in _JSONL_EXTENSIONS:
        return "jsonl"
    if ext in _PARQUET_EXTENSIONS:
        return "parquet"
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"PAR1":
        return "parquet"
    first = _first_line(p)
    if first.startswith(b"["):
        return "json"
    if first.startswith(b"{"):
        return _sniff_object_file(p, first)
    if ext == ".json":
        return "json"
    raise ValueError(
        f"cannot tell the format of {str(p)!r} (extension {ext or 'none'!r}); "
        f"accepted formats: {ACCEPTED_FORMATS}."
    )


# ----------------------------------------------------------------------------- readers


def read_json(path: Path) -> list[Any]:
    """The records of a JSON file holding a list (any values, unvalidated)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid UTF-8 ({e})") from None
    if not text.strip():
        raise ValueError(f"{str(path)!r} is empty; expected a JSON list of rows")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{str(path)!r} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
            "a JSON file must hold a list of row objects. For one object per line use "
            "JSON Lines (format='jsonl')."
        ) from None
    if not isinstance(obj, list):
        raise ValueError(  # noqa: TRY004 - a bad file layout, not a bad argument type
            f"{str(path)!r} holds a JSON {type_name(obj)}, not a list of rows; "
            f"accepted formats: {ACCEPTED_FORMATS}."
        )
    return obj


def read_jsonl_lines(path: Path) -> list[tuple[int, bytes]]:
    """The non-blank lines of a JSON Lines file as ``(1-based line number, raw bytes)``.

    A leading BOM is removed; the lines are not decoded.
    """
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    # Split on "\n" only: str.splitlines would also split on U+2028 and other
    # separators, which may appear unescaped inside JSON strings.
    return [(lineno, raw) for lineno, raw in enumerate(data.split(b"\n"), 1) if raw.strip()]


def read_parquet(path: Path) -> Any:
    """The ``pyarrow.Table`` of a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        raise ValueError(f"{str(path)!r} could not be read as Parquet: {e}") from None


def check_dataset(ds: Any, where: str) -> None:
    """Raise ``ValueError`` unless ``ds`` is a map-style ``datasets.Dataset``."""
    from datasets import Dataset, DatasetDict, IterableDataset

    if isinstance(ds, DatasetDict):
        splits = ", ".join(ds.keys())
        raise ValueError(  # noqa: TRY004 - documented as ValueError (unusable data)
            f"{where} is a DatasetDict with splits [{splits}]; pass one split "
            "(the split's folder, or dataset_dict['train'])"
        )
    if isinstance(ds, IterableDataset):
        raise ValueError(  # noqa: TRY004
            f"{where} is an IterableDataset; pass a map-style datasets.Dataset"
        )
    if not isinstance(ds, Dataset):
        raise ValueError(  # noqa: TRY004
            f"{where} is not a datasets.Dataset (got {type(ds).__name__})"
        )


def read_hf_dataset(path: Path) -> Any:
    """The ``datasets.Dataset`` saved in a folder by ``save_to_disk``."""
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(path))
    except FileNotFoundError:
        raise
    except Exception as e:  # datasets raises assorted errors for broken folders
        raise ValueError(
            f"{str(path)!r} could not be read as a saved Hugging Face dataset: {e}"
        ) from e
    check_dataset(ds, repr(str(path)))
    return ds


# ----------------------------------------------------------------------------- writers


def write_json(out: Path, records: Sequence[Any], idx: Sequence[int]) -> None:
    """Write ``records[i]`` for ``i`` in ``idx`` as an indented JSON list."""
    subset = [records[i] for i in idx]
    with open(out, "w", encoding="utf-8") as f:
        json.dump(subset, f, ensure_ascii=False, indent=2)
        f.write("\n")


def write_jsonl(out: Path, lines: Sequence[bytes], idx: Sequence[int]) -> None:
    """Write ``lines[i]`` for ``i`` in ``idx`` byte for byte, one per line."""
    with open(out, "wb") as f:
        for i in idx:
            f.write(lines[i])
            f.write(b"\n")


def write_parquet(out: Path, table: Any, idx: Sequence[int]) -> None:
    """Write the rows ``idx`` of a ``pyarrow.Table`` as Parquet (schema kept)."""
    import pyarrow.parquet as pq

    pq.write_table(table.take(idx), out)


def write_hf_dataset(out: Path, dataset: Any, idx: Sequence[int]) -> None:
    """Save ``dataset.select(idx)`` to the folder ``out``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{str(out)!r} exists and is not a folder")
    dataset.select(idx).save_to_disk(str(out))
