"""Property-based checks through the real command line on a tiny proxy: whatever
rows come in (random types, unicode, lengths, missing fields, mixed formats,
broken lines), every row comes out with a status, nothing raises, and the exit
code is 0 (something scored) or 2 (nothing could be scored, statuses written)."""

from __future__ import annotations

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gradfilter.cli import main  # noqa: E402
from gradfilter.io.models import tiny_gpt2, tiny_tokenizer  # noqa: E402

TEXT = st.text(max_size=40)  # any unicode, empty, whitespace
VALUE = st.one_of(
    TEXT, st.integers(), st.none(), st.lists(st.integers(), max_size=3), st.booleans()
)
ALPACA = st.fixed_dictionaries(
    {},
    optional={
        "instruction": st.one_of(TEXT, VALUE),
        "input": st.one_of(TEXT, VALUE),
        "output": st.one_of(TEXT, VALUE),
        "id": st.one_of(TEXT, st.integers()),
    },
)
GOOD = st.builds(
    lambda i, o: {"instruction": "Say " + i, "input": "", "output": "ok " + o}, TEXT, TEXT
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system", "x"]),
        "content": st.one_of(TEXT, VALUE),
    }
)
CHAT = st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=3)})
ROW = st.one_of(GOOD, ALPACA, CHAT, VALUE)
LINE = st.one_of(ROW.map(json.dumps), st.text(max_size=30).filter(lambda s: "\n" not in s))


@pytest.fixture(scope="module")
def proxy_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("proxy")
    tiny_gpt2(seed=0, n_positions=128).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(lines=st.lists(LINE, min_size=1, max_size=8))
def test_any_rows_in_every_row_out(lines, proxy_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    data = folder / "data.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = folder / "out"
    rc = main(
        [
            "score",
            str(data),
            "-o",
            str(out),
            "--proxy",
            str(proxy_dir),
            "--members",
            "2",
            "--rank",
            "2",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--max-length",
            "64",
            "--no-progress",
            "--show",
            "0",
            "--checkpoint-seconds",
            "1000",
        ]
    )
    assert rc in (0, 2)
    recs = [json.loads(x) for x in (out / "scores.jsonl").read_text("utf-8").splitlines()]
    n_rows = sum(1 for x in lines if x.strip())  # blank lines are not rows
    assert [r["index"] for r in recs] == list(range(n_rows))
    assert all(isinstance(r["status"], str) and r["status"] for r in recs)
    scored = [r for r in recs if r["score"] is not None]
    assert all(r["status"] == "ok" for r in scored)
    assert (rc == 0) == bool(scored)
