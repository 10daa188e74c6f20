"""Tests of gradfilter.io.rows: reading every input format and writing subsets back."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradfilter.io.rows import Row, Source, content_hash, load_rows, sniff_format, write_subset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

RECORDS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Translate to French.", "input": "good morning", "output": "bonjour"},
    {"instruction": "Écris un haïku.", "input": "", "output": "Neige — silence\u2028blanc."},
    {"instruction": "Add the numbers.", "input": "2, 3", "output": "5", "extra": [1, 2]},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
]

CHAT = [
    {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there!"},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "6"},
        ]
    },
]


def _expected_hash(obj: object) -> str:
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _write_jsonl(path: Path, records: list) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("order", ["input", "rank"])
def test_json_list_round_trip(tmp_path: Path, order: str) -> None:
    src = tmp_path / "data.json"
    src.write_text(json.dumps(RECORDS, ensure_ascii=False, indent=2), "utf-8")
    rows, source = load_rows(src)
    assert source.kind == "json"
    assert [r.index for r in rows] == list(range(len(RECORDS)))
    assert all(r.status == "ok" and r.kind == "alpaca" for r in rows)
    assert [r.record for r in rows] == RECORDS
    assert rows[1].input == "good morning" and rows[2].output == RECORDS[2]["output"]

    picked = [3, 0, 2]
    out = write_subset(rows, source, picked, tmp_path / "out" / "subset.json", order=order)
    want_idx = sorted(picked) if order == "input" else picked
    want = [RECORDS[i] for i in want_idx]
    text = Path(out).read_text("utf-8")
    assert text == json.dumps(want, ensure_ascii=False, indent=2) + "\n"
    again, again_source = load_rows(out)
    assert again_source.kind == "json"
    assert [r.record for r in again] == want
    assert [r.id for r in again] == [rows[i].id for i in want_idx]


def test_jsonl_round_trip_keeps_lines_verbatim(tmp_path: Path) -> None:
    lines = [
        json.dumps(RECORDS[0]),
        '{"instruction": "Odd   spacing",   "output": "kept"}',
        "{not json at all",
        json.dumps(RECORDS[2], ensure_ascii=False),  # raw U+2028 inside a string
        json.dumps(CHAT[0]) + "\r",  # CRLF line ending
    ]
    raw = ("\n\n".join(lines) + "\n   \n").encode("utf-8")
    src = tmp_path / "data.jsonl"
    src.write_bytes(raw)
    rows, source = load_rows(src)
    assert source.kind == "jsonl"
    assert len(rows) == len(lines)  # blank lines are not rows
    assert [r.kind for r in rows] == ["alpaca", "alpaca", "invalid", "alpaca", "chat"]
    assert rows[2].record == "{not json at all"
    assert rows[3].output == RECORDS[2]["output"]

    out = write_subset(rows, source, [4, 2, 1], tmp_path / "sub.jsonl", order="rank")
    assert Path(out).read_bytes() == "\n".join([lines[4], lines[2], lines[1]]).encode() + b"\n"
    out = write_subset(rows, source, [4, 2, 1], tmp_path / "sub2.jsonl")
    assert Path(out).read_bytes() == "\n".join([lines[1], lines[2], lines[4]]).encode() + b"\n"
    again, _ = load_rows(out)
    assert [r.record for r in again] == [rows[1].record, "{not json at all", CHAT[0]]


def test_parquet_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "data.parquet"
    # from_pylist takes the schema from the first record, which has the "extra" column.
    table = pa.Table.from_pylist([RECORDS[3]] + RECORDS[:3] + RECORDS[4:])
    pq.write_table(table, src)
    rows, source = load_rows(src)
    assert source.kind == "parquet"
    assert [r.status for r in rows] == ["ok"] * 5
    assert rows[0].record == RECORDS[3]
    # Columns absent from a record are null in Parquet: the record gains "extra": None.
    assert rows[1].record == dict(RECORDS[0], extra=None)
    out = write_subset(rows, source, [3, 1], tmp_path / "sub.parquet", order="rank")
    back = pq.read_table(out)
    assert back.schema == table.schema
    assert back.to_pylist() == [table.to_pylist()[3], table.to_pylist()[1]]


def test_parquet_chat_rows(tmp_path: Path) -> None:
    src = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(CHAT), src)
    rows, source = load_rows(src)
    assert [r.kind for r in rows] == ["chat", "chat"]
    assert [r.status for r in rows] == ["ok", "ok"]
    assert rows[1].messages == CHAT[1]["messages"]
    out = write_subset(rows, source, [1], tmp_path / "sub.parquet")
    assert pq.read_table(out).to_pylist() == [CHAT[1]]


def test_hf_dataset_round_trip(tmp_path: Path) -> None:
    from datasets import Dataset, load_from_disk

    records = [dict(r, id=f"r{i}") for i, r in enumerate(RECORDS[:3])]
    folder = tmp_path / "ds"
    Dataset.from_list(records).save_to_disk(str(folder))
    assert sniff_format(folder) == "hf_dataset"
    rows, source = load_rows(folder)
    assert source.kind == "hf_dataset"
    assert [r.id for r in rows] == ["r0", "r1", "r2"]
    out = write_subset(rows, source, [2, 0], tmp_path / "sub_ds", order="rank")
    back = load_from_disk(out).to_list()
    assert [b["id"] for b in back] == ["r2", "r0"]
    assert back == [rows[2].record, rows[0].record]
    again, again_source = load_rows(out)
    assert again_source.kind == "hf_dataset" and [r.id for r in again] == ["r2", "r0"]


def test_python_records_and_dataset() -> None:
    from datasets import Dataset

    records = [dict(r) for r in RECORDS]
    rows, source = load_rows(records)
    assert source.kind == "records" and source.path is None
    sub = write_subset(rows, source, [4, 1], order="rank")
    assert sub == [records[4], records[1]] and sub[0] is records[4]
    assert write_subset(rows, source, [4, 1]) == [records[1], records[4]]

    ds = Dataset.from_list(CHAT + CHAT)
    rows, source = load_rows(ds)
    assert source.kind == "dataset" and len(rows) == 4
    assert all(r.kind == "chat" and r.status == "ok" for r in rows)
    sub_ds = write_subset(rows, source, [3, 0], order="rank")
    assert isinstance(sub_ds, Dataset)
    assert sub_ds.to_list() == [ds[3], ds[0]]


def test_dataset_dict_is_rejected(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    dd = DatasetDict(
        {"train": Dataset.from_list(RECORDS[:2]), "test": Dataset.from_list(RECORDS[2:3])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="train"):
        load_rows(tmp_path / "dd")
    with pytest.raises(ValueError, match="DatasetDict"):
        load_rows(dd)
    rows, source = load_rows(tmp_path / "dd" / "train")
    assert [r.record for r in rows] == RECORDS[:2] and source.kind == "hf_dataset"


# ----------------------------------------------------------------------------- bad rows


def test_bad_rows_get_statuses_and_rows_in_equal_rows_out(tmp_path: Path) -> None:
    lines = [
        json.dumps({"instruction": "ok row", "output": "fine"}),  # input missing is fine
        '{"instruction": "broken", "output": ',
        json.dumps({"instruction": "no output"}),
        json.dumps({"instruction": 42, "output": "x"}),
        json.dumps({"instruction": "empty", "input": "", "output": "  \n"}),
        json.dumps({"messages": [{"role": "user", "content": "hello?"}]}),
        json.dumps(
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}
        ),
        json.dumps(
            {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "b"}]}
        ),
        json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}),
        json.dumps({"messages": "just text"}),
        json.dumps({"messages": []}),
        json.dumps({"messages": ["hi", {"role": "assistant", "content": "b"}]}),
        "[1, 2]",
        json.dumps({"instruction": "null input", "input": None, "output": "fine"}),
        json.dumps({"instruction": "bad input", "input": ["x"], "output": "fine"}),
        json.dumps({"instruction": None, "output": "y"}),
        "",
        "\t",
    ]
    src = tmp_path / "bad.jsonl"
    src.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe not utf8\n")
    rows, source = load_rows(src)
    assert len(rows) == 17 == source.n_rows
    assert [r.index for r in rows] == list(range(17))
    assert [r.status for r in rows] == [
        "ok",
        "invalid JSON on line 2 (column 37: Expecting value)",
        "missing field 'output'",
        "field 'instruction' is not a string (got number)",
        "empty response",
        "no assistant turn",
        "empty response",
        "messages[0].content is not a string (got null)",
        "messages[0] has no 'content'",
        "field 'messages' is not a list (got string)",
        "field 'messages' is empty",
        "messages[0] is not an object (got string)",
        "line 13: row is not an object (got array)",
        "ok",
        "field 'input' is not a string (got array)",
        "missing field 'instruction'",
        "line 19 is not valid UTF-8",
    ]
    assert [r.kind for r in rows] == (
        ["alpaca", "invalid"]
        + ["alpaca"] * 3
        + ["chat"] * 7
        + ["invalid"]
        + ["alpaca"] * 3
        + ["invalid"]
    )
    assert rows[0].input == "" and rows[13].input == ""
    assert rows[3].instruction is None and rows[3].output == "x"
    # Invalid rows still get distinct, stable ids, and can be written back.
    assert len({r.id for r in rows}) == len(rows)
    out = write_subset(rows, source, [1, 16], tmp_path / "bad_sub.jsonl")
    assert Path(out).read_bytes() == lines[1].encode() + b"\n\xff\xfe not utf8\n"


def test_json_list_non_object_items() -> None:
    rows, _ = load_rows([RECORDS[0], "text", None, 5])
    assert [r.status for r in rows] == [
        "ok",
        "row is not an object (got string)",
        "row is not an object (got null)",
        "row is not an object (got number)",
    ]
    assert [r.kind for r in rows] == ["alpaca", "invalid", "invalid", "invalid"]


# ----------------------------------------------------------------------------- fields, ids


def test_field_mapping() -> None:
    fields = {
        "instruction": "question",
        "output": "answer",
        "input": "context",
        "id": "uid",
        "messages": "conversation",
    }
    records = [
        {"uid": 7, "question": "Q?", "context": "C", "answer": "A", "output": "ignored"},
        {"question": "Q2?", "answer": ""},
        {"question": "Q3?"},
        {"conversation": CHAT[0]["messages"], "uid": "c1"},
        {"messages": CHAT[0]["messages"]},  # unmapped name: not a chat row here
    ]
    rows, source = load_rows(records, fields=fields)
    assert source.fields["instruction"] == "question" and source.fields["id"] == "uid"
    assert (rows[0].instruction, rows[0].input, rows[0].output, rows[0].id) == ("Q?", "C", "A", "7")
    assert rows[1].status == "empty response"
    assert rows[2].status == "missing field 'answer'"
    assert rows[3].kind == "chat" and rows[3].status == "ok" and rows[3].id == "c1"
    assert rows[3].messages == CHAT[0]["messages"]
    assert rows[4].kind == "alpaca" and rows[4].status == "missing field 'question'"

    with pytest.raises(ValueError, match="unknown field 'prompt'"):
        load_rows(records, fields={"prompt": "question"})


def test_ids_own_and_content_hash(tmp_path: Path) -> None:
    records = [
        {"id": "abc", "instruction": "i", "output": "o"},
        {"id": 12, "instruction": "i", "output": "o"},
        {"instruction": "i", "input": "", "output": "o"},
        {"instruction": "i", "output": "o", "category": "x"},
        {"instruction": "i", "input": "z", "output": "o"},
        {"id": None, "instruction": "i", "output": "o2"},
        CHAT[0],
    ]
    rows, _ = load_rows(records)
    assert rows[0].id == "abc" and rows[1].id == "12"
    h = _expected_hash({"instruction": "i", "input": "", "output": "o"})
    # Missing input hashes like empty input; extra fields are not part of the hash.
    assert (
        rows[2].id
        == rows[3].id
        == h
        == content_hash({"instruction": "i", "input": "", "output": "o"})
    )
    assert rows[4].id not in (h, rows[5].id) and len(rows[4].id) == 16
    assert rows[5].id == _expected_hash({"instruction": "i", "input": "", "output": "o2"})
    assert rows[6].id == _expected_hash({"messages": CHAT[0]["messages"]})

    # Stable across formats and field names.
    src = tmp_path / "renamed.jsonl"
    _write_jsonl(src, [{"q": "i", "a": "o"}])
    again, _ = load_rows(src, fields={"instruction": "q", "output": "a"})
    assert again[0].id == h
    int(h, 16)  # hex digits


# ----------------------------------------------------------------------------- detection, errors


def test_sniffing(tmp_path: Path) -> None:
    jsonl_as_json = tmp_path / "export.json"
    _write_jsonl(jsonl_as_json, RECORDS[:2])
    assert sniff_format(jsonl_as_json) == "jsonl"
    rows, source = load_rows(jsonl_as_json)
    assert source.kind == "jsonl" and [r.record for r in rows] == RECORDS[:2]
    out = write_subset(rows, source, [1], tmp_path / "sub.json")
    assert Path(out).read_text("utf-8") == json.dumps(RECORDS[1]) + "\n"

    broken_first = tmp_path / "broken.json"
    broken_first.write_text('{"instruction": \n' + json.dumps(RECORDS[0]) + "\n", "utf-8")
    rows, source = load_rows(broken_first)
    assert source.kind == "jsonl" and [r.kind for r in rows] == ["invalid", "alpaca"]

    no_ext = tmp_path / "data"
    no_ext.write_text("\ufeff\n  " + json.dumps(RECORDS), "utf-8")
    assert sniff_format(no_ext) == "json"
    assert [r.record for r in load_rows(no_ext)[0]] == RECORDS

    pq_no_ext = tmp_path / "table.bin"
    pq.write_table(pa.Table.from_pylist(RECORDS[:1]), pq_no_ext)
    assert sniff_format(pq_no_ext) == "parquet"

    txt = tmp_path / "rows.txt"
    _write_jsonl(txt, RECORDS[:1])
    assert sniff_format(txt) == "jsonl"


def test_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_rows(missing)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_rows(str(missing), format="json")

    csv = tmp_path / "data.csv"
    csv.write_text("instruction,output\na,b\n", "utf-8")
    with pytest.raises(ValueError, match=r"data\.csv.*accepted formats.*Parquet"):
        load_rows(csv)

    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ValueError, match="not a saved Hugging Face dataset"):
        load_rows(folder)

    good = tmp_path / "good.json"
    good.write_text(json.dumps(RECORDS), "utf-8")
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        load_rows(good, format="xml")
    with pytest.raises(ValueError, match="is a file"):
        load_rows(good, format="hf_dataset")

    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"data": RECORDS}, indent=2), "utf-8")
    with pytest.raises(ValueError, match="not a list of rows"):
        load_rows(obj)

    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(RECORDS)[:-5], "utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_rows(broken)

    empty = tmp_path / "empty.json"
    empty.write_text("", "utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_rows(empty)

    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="Parquet"):
        load_rows(bad_parquet)

    with pytest.raises(TypeError):
        load_rows(123)
    with pytest.raises(TypeError):
        load_rows({"instruction": "a", "output": "b"})


def test_write_subset_errors(tmp_path: Path) -> None:
    src = tmp_path / "data.json"
    src.write_text(json.dumps(RECORDS), "utf-8")
    rows, source = load_rows(src)
    with pytest.raises(IndexError):
        write_subset(rows, source, [len(RECORDS)], tmp_path / "o.json")
    with pytest.raises(ValueError, match="more than once"):
        write_subset(rows, source, [1, 1], tmp_path / "o.json")
    with pytest.raises(ValueError, match="order"):
        write_subset(rows, source, [1], tmp_path / "o.json", order="score")
    with pytest.raises(ValueError, match="output path"):
        write_subset(rows, source, [1], None)
    with pytest.raises(ValueError, match="overwrite"):
        write_subset(rows, source, [1], src)
    with pytest.raises(ValueError, match="rows"):
        write_subset(rows[:2], source, [1], tmp_path / "o.json")
    # An empty selection is a valid (empty) subset.
    out = write_subset(rows, source, [], tmp_path / "empty.json")
    assert json.loads(Path(out).read_text("utf-8")) == []


def test_row_and_source_types() -> None:
    rows, source = load_rows([RECORDS[0]])
    assert isinstance(rows[0], Row) and isinstance(source, Source)
    assert rows[0].ok and "records=" not in repr(source)


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} absent")
def test_real_alpaca_and_dolly(tmp_path: Path) -> None:
    rows, source = load_rows(SHARED_DATA / "alpaca_9k.json")
    assert source.kind == "json" and len(rows) == 9229
    bad = [r for r in rows if r.status != "ok"]
    assert {r.status for r in bad} <= {"empty response"} and len(bad) == 4
    assert all(r.kind == "alpaca" for r in rows)
    assert len({r.id for r in rows}) == len(rows)  # all rows distinct -> all hashes distinct

    rows, source = load_rows(SHARED_DATA / "dolly_3k.json")
    assert len(rows) == 2996 and all(r.status == "ok" for r in rows)
    assert all("category" in r.record for r in rows)
    picked = [2995, 10, 0, 1234]
    out = write_subset(rows, source, picked, tmp_path / "dolly_sub.json", order="rank")
    original = json.loads((SHARED_DATA / "dolly_3k.json").read_text("utf-8"))
    assert json.loads(Path(out).read_text("utf-8")) == [original[i] for i in picked]
