"""The rows of a corpus larger than memory: read and tokenised as a stream into
files, read back a batch at a time (``gradfilter score DATA --stream``).

:func:`build_store` reads ``DATA`` with :func:`gradfilter.io.rows.iter_rows`
(JSON Lines line by line, Parquet and saved datasets in record batches),
tokenises ``chunk`` rows at a time and appends them to a folder:

* ``ids.bin`` / ``labels.bin``: every scorable row's token ids and labels,
  int32, one after the other;
* ``keys.bin``: every row's id (UTF-8, one after the other).

What stays in memory is a few small arrays per row (:data:`BYTES_PER_ROW`: where
a row's tokens and id start, its length, response tokens and truncation) and
the status of each row that cannot be scored.  :class:`RowStore` is the
:class:`~gradfilter.run.score.Prepared` of such a run: ``encoded[i]`` reads row
i's tokens from disk (two ``pread`` calls) and ``rows[i]`` is a light
:class:`StoredRow` (index, id, status).  The ``rows_fingerprint`` that
``select`` checks (every row's content) is taken as the rows stream by, so the
texts are never held; the checkpoint's row hash reads the store back.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradfilter.io.data import EncodedRow

__all__ = ["BYTES_PER_ROW", "CHUNK_ROWS", "RowStore", "StoredRow", "build_store"]

#: Rows read and tokenised at a time.
CHUNK_ROWS = 2048
#: Bytes held in memory per row by a store (token offset, length, token and
#: response counts, truncation, id offset).
BYTES_PER_ROW = 8 + 4 + 4 + 4 + 1 + 8


@dataclass
class StoredRow:
    """What a run needs of a row it does not hold: its place, id and status."""

    index: int
    id: str
    status: str
    kind: str = "stored"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class _View(Sequence):
    """One thing per input row, made when it is read: ``store.rows`` (a
    :class:`StoredRow`) or ``store.encoded`` (an :class:`EncodedRow`, None for a
    row that cannot be scored)."""

    def __init__(self, store: RowStore, item: Callable[[int], Any]) -> None:
        self.store, self.item = store, item

    def __len__(self) -> int:
        return self.store.n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.item(int(i))


class _Encoded(_View):
    def __setitem__(self, i: int, value: Any) -> None:
        if value is not None:
            raise TypeError("a stored row's tokens cannot be replaced, only dropped (None)")
        self.store.drop(int(i), None)


class RowStore:
    """Rows tokenised into ``folder`` (see the module doc); built by :func:`build_store`."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.n = 0
        self.offset = np.zeros(0, dtype=np.int64)  # first token in ids.bin / labels.bin
        self.length = np.zeros(0, dtype=np.int32)  # tokens kept; 0: not scorable
        self.n_tokens = np.zeros(0, dtype=np.int32)
        self.n_response = np.zeros(0, dtype=np.int32)
        self.truncated = np.zeros(0, dtype=np.int8)
        self.key_offset = np.zeros(1, dtype=np.int64)  # row i's id: keys.bin[ko[i]:ko[i+1]]
        self.statuses: dict[int, str] = {}  # rows that are not "ok"
        self.rows_fingerprint = ""
        self._fds: dict[str, int] = {}
        self.rows = _View(self, lambda i: StoredRow(i, self.row_id(i), self.status(i)))
        self.encoded = _Encoded(self, self.read)

    def __len__(self) -> int:
        return self.n

    # -- reading --------------------------------------------------------------------

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = os.open(os.path.join(self.folder, name), os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _ints(self, name: str, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int32)
        if os.preadv(self._fd(name), [out], 4 * start) != 4 * count:
            raise OSError(f"{os.path.join(self.folder, name)} is shorter than its index")
        return out

    def read(self, i: int) -> EncodedRow | None:
        """Row ``i``'s tokens from disk, or None when it cannot be scored."""
        n = int(self.length[i])
        if n == 0:
            return None
        start = int(self.offset[i])
        return EncodedRow(
            self._ints("ids.bin", start, n),
            self._ints("labels.bin", start, n),
            bool(self.truncated[i]),
            int(self.n_tokens[i]),
            int(self.n_response[i]),
        )

    def row_id(self, i: int) -> str:
        a, b = int(self.key_offset[i]), int(self.key_offset[i + 1])
        return os.pread(self._fd("keys.bin"), b - a, a).decode("utf-8")

    def ids(self, start: int, stop: int) -> list[str]:
        """The ids of rows ``start .. stop - 1``, in one read."""
        a, b = int(self.key_offset[start]), int(self.key_offset[stop])
        raw = os.pread(self._fd("keys.bin"), b - a, a)
        cuts = (self.key_offset[start : stop + 1] - a).tolist()
        return [raw[cuts[k] : cuts[k + 1]].decode("utf-8") for k in range(stop - start)]

    def status(self, i: int) -> str:
        return self.statuses.get(i, "ok")

    # -- what a run changes ---------------------------------------------------------

    def set_status(self, i: int, status: str) -> None:
        if status == "ok":
            self.statuses.pop(i, None)
        else:
            self.statuses[i] = status

    def drop(self, i: int, status: str | None) -> None:
        """Row ``i`` is not scored after all (too long for the budget, ...)."""
        self.length[i] = 0
        if status is not None:
            self.set_status(i, status)

    # -- what a run reads of every row -----------------------------------------------

    @property
    def ok(self) -> np.ndarray:
        return np.flatnonzero(self.length > 0)

    def meta(self, start: int, stop: int) -> list[dict[str, Any]]:
        """The :data:`~gradfilter.run.records.ROW_FIELDS` of rows ``start .. stop - 1``."""
        ids = self.ids(start, stop)
        out = []
        for k, i in enumerate(range(start, stop)):
            scored = self.length[i] > 0
            out.append(
                {
                    "index": i,
                    "id": ids[k],
                    "status": self.status(i),
                    "n_tokens": int(self.n_tokens[i]) if scored else None,
                    "n_response_tokens": int(self.n_response[i]) if scored else None,
                    "truncated": bool(self.truncated[i]) if scored else None,
                }
            )
        return out


def content_hash_update(h: Any, row: Any) -> None:
    """Add a row's position, id and content to ``h`` (the ``rows_fingerprint`` of
    :mod:`gradfilter.run.records`, one row at a time)."""
    content = [row.index, row.id, row.kind, row.instruction, row.input, row.output, row.messages]
    h.update(json.dumps(content, ensure_ascii=False, default=str).encode("utf-8"))
    h.update(b"\x1e")


def build_store(
    data: Any,
    folder: str,
    tokenizer: Any,
    max_length: int,
    template: str | None = None,
    fields: dict[str, str] | None = None,
    *,
    chunk: int | None = None,
    log: Callable[[str], None] | None = None,
    every: int = 200_000,
) -> RowStore:
    """Read and tokenise ``data`` ``chunk`` rows (default :data:`CHUNK_ROWS`) at a
    time into ``folder`` (its files replaced); the :class:`RowStore`.  Statuses,
    ids and tokens equal those of :func:`gradfilter.run.score.prepare` for the
    same rows.  ``log`` hears about progress every ``every`` rows."""
    from gradfilter.io.data import encode_rows
    from gradfilter.io.rows import iter_rows

    chunk = chunk or CHUNK_ROWS
    os.makedirs(folder, exist_ok=True)
    store = RowStore(folder)
    offset, length, n_tok, n_resp = array("q"), array("i"), array("i"), array("i")
    truncated = array("b")
    key_offset = array("q", [0])
    fingerprint = hashlib.sha256()
    tokens = keys = 0
    batch: list[Any] = []
    paths = {name: os.path.join(folder, name + ".tmp") for name in ("ids.bin", "labels.bin")}
    paths["keys.bin"] = os.path.join(folder, "keys.bin.tmp")
    with (
        open(paths["ids.bin"], "wb") as f_ids,
        open(paths["labels.bin"], "wb") as f_labels,
        open(paths["keys.bin"], "wb") as f_keys,
    ):

        def flush() -> None:
            nonlocal tokens, keys
            encoded, statuses = encode_rows(batch, tokenizer, max_length, template, small=True)
            for row, enc, status in zip(batch, encoded, statuses, strict=True):
                content_hash_update(fingerprint, row)
                key = row.id.encode("utf-8")
                f_keys.write(key)
                keys += len(key)
                key_offset.append(keys)
                if status != "ok":
                    store.statuses[row.index] = status
                offset.append(tokens)
                if enc is None:
                    length.append(0)
                    n_tok.append(0)
                    n_resp.append(0)
                    truncated.append(0)
                    continue
                ids = np.asarray(enc.input_ids, dtype=np.int32)
                f_ids.write(ids.tobytes())
                f_labels.write(np.asarray(enc.labels, dtype=np.int32).tobytes())
                tokens += len(ids)
                length.append(len(ids))
                n_tok.append(enc.n_tokens)
                n_resp.append(enc.n_response_tokens)
                truncated.append(int(bool(enc.truncated)))
            batch.clear()

        n = 0
        for row in iter_rows(data, fields=fields):
            batch.append(row)
            n += 1
            if len(batch) == chunk:
                flush()
            if log is not None and n % every == 0:
                log(f"reading rows: {n} read, {n - len(store.statuses) - len(batch)} scorable")
        if batch:
            flush()
    for name, tmp in paths.items():
        os.replace(tmp, os.path.join(folder, name))
    store.n = n
    store.offset = np.frombuffer(offset, dtype=np.int64).copy()
    store.length = np.frombuffer(length, dtype=np.int32).copy()
    store.n_tokens = np.frombuffer(n_tok, dtype=np.int32).copy()
    store.n_response = np.frombuffer(n_resp, dtype=np.int32).copy()
    store.truncated = np.frombuffer(truncated, dtype=np.int8).copy()
    store.key_offset = np.frombuffer(key_offset, dtype=np.int64).copy()
    store.rows_fingerprint = fingerprint.hexdigest()[:16]
    return store
