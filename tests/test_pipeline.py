"""The GradFiltering pipeline end to end on a tiny model: rows in = rows out,
statuses, determinism, resume after a kill, selection in the input's format."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from gradfilter.io.models import tiny_gpt2, tiny_tokenizer
from gradfilter.run.score import ScoreConfig, score, select

GOOD = [
    ("Add two and three.", "", "Two plus three is five."),
    ("Name a colour.", "", "Blue."),
    ("Spell cat backwards.", "", "tac"),
    ("Say hello.", "", "Hello!"),
    ("Give a fruit.", "apple or stone", "An apple is a fruit."),
    ("Count to four.", "", "1, 2, 3, 4"),
    ("Opposite of hot?", "", "Cold."),
    ("Capital of France?", "", "Paris."),
    ("Is ice cold?", "", "Yes, ice is cold."),
    ("Repeat: ok", "", "ok"),
    ("What is 2*3?", "", "6"),
    ("Name a pet.", "", "A dog."),
]


def write_jsonl(path, extra_bad=True):
    lines = [json.dumps({"instruction": i, "input": x, "output": o}) for i, x, o in GOOD]
    if extra_bad:
        lines.insert(3, '{"instruction": "broken json", "output": ')
        lines.insert(6, json.dumps({"instruction": "No output field"}))
        lines.insert(8, json.dumps({"instruction": "Empty", "output": "   "}))
        lines.insert(9, json.dumps({"instruction": 7, "output": "number instruction"}))
        lines.append(json.dumps({"instruction": "x" * 200, "output": "too long prompt"}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def proxy(seed=0):
    return tiny_gpt2(seed=seed, n_positions=128), tiny_tokenizer()


CFG = dict(members=3, rank=4, alpha=8, epochs=2, batch_size=4, max_length=96, lr=5e-3)


def read(outdir):
    with open(os.path.join(outdir, "scores.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_rows_in_rows_out_statuses_and_outputs(tmp_path):
    data = tmp_path / "data.jsonl"
    n = write_jsonl(data)
    out = tmp_path / "out"
    res = score(
        str(data), str(out), ScoreConfig(**CFG), progress=False, model_and_tokenizer=proxy()
    )
    recs = read(out)
    assert len(recs) == n == len(res.records)
    assert [r["index"] for r in recs] == list(range(n))
    by_status = {r["index"]: r["status"] for r in recs}
    assert "invalid JSON" in by_status[3]
    assert "output" in by_status[6]
    assert "empty" in by_status[8]
    assert "instruction" in by_status[9]
    assert "no response token" in by_status[n - 1]
    ok = [r for r in recs if r["status"] == "ok"]
    assert len(ok) == len(GOOD)
    for r in ok:
        assert math.isfinite(r["gsnr"]) and len(r["early_sq"]) == 3 and len(r["late_sq"]) == 3
        assert r["n_tokens"] > 0 and r["truncated"] is False
        mean_e = sum(r["early_sq"]) / 3
        assert r["early_mean"] == pytest.approx(mean_e)
        assert r["drop"] == pytest.approx(
            (r["early_mean"] - r["late_mean"]) / (r["early_mean"] + 1e-8)
        )
    # Ranks: scored rows 1..k by G-SNR, unscored after them in input order.
    ranks = sorted(r["rank"] for r in recs)
    assert ranks == list(range(1, n + 1))
    assert max(r["rank"] for r in ok) == len(ok)
    best = sorted(ok, key=lambda r: -r["gsnr"])
    assert [r["rank"] for r in best] == list(range(1, len(ok) + 1))
    run = json.loads((out / "run.json").read_text())
    for key in ("config", "versions", "seed", "timings", "tokens_per_second", "padding_fraction"):
        assert key in run
    assert 0 <= run["padding_fraction"] < 1
    assert (out / "gsnr_distribution.png").stat().st_size > 1000
    assert (out / "drop_vs_variance.png").stat().st_size > 1000
    assert not (out / "checkpoint.pt.tmp").exists()


def test_same_seed_same_scores_and_seed_matters(tmp_path):
    data = tmp_path / "d.jsonl"
    write_jsonl(data, extra_bad=False)
    a = score(str(data), None, ScoreConfig(**CFG), progress=False, model_and_tokenizer=proxy())
    b = score(str(data), None, ScoreConfig(**CFG), progress=False, model_and_tokenizer=proxy())
    c = score(
        str(data), None, ScoreConfig(**CFG, seed=1), progress=False, model_and_tokenizer=proxy()
    )
    assert [r["gsnr"] for r in a.records] == [r["gsnr"] for r in b.records]
    assert [r["gsnr"] for r in a.records] != [r["gsnr"] for r in c.records]


def test_resume_after_interruption_gives_identical_scores(tmp_path):
    data = tmp_path / "d.jsonl"
    write_jsonl(data)
    full = score(
        str(data),
        str(tmp_path / "full"),
        ScoreConfig(**CFG),
        progress=False,
        model_and_tokenizer=proxy(),
    )
    out = str(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        score(
            str(data),
            out,
            ScoreConfig(**CFG, checkpoint_seconds=0),
            progress=False,
            model_and_tokenizer=proxy(),
            stop_after=3,
        )
    assert os.path.exists(os.path.join(out, "checkpoint.pt"))
    assert not os.path.exists(os.path.join(out, "scores.jsonl"))
    resumed = score(
        str(data),
        out,
        ScoreConfig(**CFG, checkpoint_seconds=0),
        progress=False,
        model_and_tokenizer=proxy(),
    )
    assert [r["gsnr"] for r in resumed.records] == [r["gsnr"] for r in full.records]
    assert [r["late_sq"] for r in resumed.records] == [r["late_sq"] for r in full.records]
    # A different configuration in the same folder is refused, not mixed in.
    with pytest.raises(ValueError, match="different run|another run"):
        score(
            str(data),
            out,
            ScoreConfig(**{**CFG, "members": 2}),
            progress=False,
            model_and_tokenizer=proxy(),
        )


def test_select_writes_input_format(tmp_path):
    data = tmp_path / "d.jsonl"
    n = write_jsonl(data)
    out = tmp_path / "out"
    score(str(data), str(out), ScoreConfig(**CFG), progress=False, model_and_tokenizer=proxy())
    recs = read(out)
    path, chosen = select(str(out), ratio=0.3)
    assert len(chosen) == math.floor(0.3 * n)
    lines = [line for line in open(path, encoding="utf-8").read().splitlines() if line]
    original = data.read_text(encoding="utf-8").splitlines()
    best = sorted((r for r in recs if r["status"] == "ok"), key=lambda r: r["rank"])
    assert lines == [original[r["index"]] for r in best[: len(chosen)]]
    _, all_rows = select(str(out), top_k=100, output=str(tmp_path / "all.jsonl"))
    assert len(all_rows) == len(GOOD)  # never more than the rows that scored


def test_python_api_list_and_dataset(tmp_path):
    import datasets

    records = [{"question": i, "context": x, "answer": o} for i, x, o in GOOD[:8]]
    fields = {"instruction": "question", "input": "context", "output": "answer"}
    cfg = ScoreConfig(**{**CFG, "members": 2}, fields=fields)
    res = score(records, None, cfg, progress=False, model_and_tokenizer=proxy())
    assert len(res.records) == 8 and all(r["status"] == "ok" for r in res.records)
    subset, chosen = res.select(top_k=3)
    assert len(chosen) == 3 and [records[i] for i in chosen] == list(subset)
    ds = datasets.Dataset.from_list(records)
    res2 = score(ds, None, cfg, progress=False, model_and_tokenizer=proxy())
    assert [r["gsnr"] for r in res2.records] == [r["gsnr"] for r in res.records]


def test_chat_rows(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, _, a in GOOD[:6]
    ]
    rows.append({"messages": [{"role": "user", "content": "no answer"}]})
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = score(
        str(data),
        None,
        ScoreConfig(**{**CFG, "members": 2}),
        progress=False,
        model_and_tokenizer=proxy(),
    )
    assert [r["status"] == "ok" for r in res.records] == [True] * 6 + [False]
    assert all(math.isfinite(r["gsnr"]) for r in res.records[:6])


def test_dry_run_trains_nothing(tmp_path):
    data = tmp_path / "d.jsonl"
    write_jsonl(data)
    res = score(
        str(data),
        str(tmp_path / "out"),
        ScoreConfig(**CFG),
        dry_run=True,
        progress=False,
        model_and_tokenizer=proxy(),
    )
    plan = res.run["plan"]
    assert plan["rows"] == 17 and plan["scorable_rows"] == len(GOOD)
    assert plan["training_steps"] == 2 * 3  # 12 rows, batch 4, 2 epochs
    assert res.records == [] and not (tmp_path / "out" / "scores.jsonl").exists()


def test_bad_config_and_unreadable_input(tmp_path):
    with pytest.raises(ValueError, match="early < late"):
        ScoreConfig(early=2, late=2).validate()
    with pytest.raises(FileNotFoundError):
        score(
            str(tmp_path / "missing.json"),
            None,
            ScoreConfig(**CFG),
            progress=False,
            model_and_tokenizer=proxy(),
        )


@pytest.mark.slow
def test_cli_kill_9_and_resume(tmp_path):
    """The real command, killed with SIGKILL mid-run, resumes to the same scores."""
    model, tok = proxy()
    model_dir = tmp_path / "proxy"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "d.jsonl"
    write_jsonl(data)
    base = [
        sys.executable,
        "-m",
        "gradfilter",
        "score",
        str(data),
        "--proxy",
        str(model_dir),
        "--members",
        "3",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--batch-size",
        "2",
        "--max-length",
        "96",
        "--lr",
        "5e-3",
        "--no-progress",
        "--checkpoint-seconds",
        "0",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        base + ["-o", str(tmp_path / "full")], check=True, env=env, capture_output=True, timeout=600
    )
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        base + ["-o", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    ckpt = out / "checkpoint.pt"
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    subprocess.run(base + ["-o", str(out)], check=True, env=env, capture_output=True, timeout=600)
    assert read(out) == read(tmp_path / "full")


def test_cli_score_select_and_norms(tmp_path):
    model, tok = proxy()
    model_dir = tmp_path / "proxy"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "d.json"
    rows = [{"instruction": i, "input": x, "output": o} for i, x, o in GOOD[:8]]
    rows.append({"instruction": "missing output"})
    data.write_text(json.dumps(rows))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(*a):
        return subprocess.run(
            [sys.executable, "-m", "gradfilter", *a],
            env=env,  # noqa: E731
            capture_output=True,
            text=True,
            timeout=600,
        )

    out = tmp_path / "out"
    r = run(
        "score",
        str(data),
        "-o",
        str(out),
        "--proxy",
        str(model_dir),
        "--members",
        "2",
        "--max-length",
        "96",
        "--no-progress",
        "--show",
        "2",
    )
    assert r.returncode == 0, r.stderr
    assert "top 2 by gsnr" in r.stdout and "missing field 'output'" in r.stdout
    r = run("select", str(out), "--ratio", "0.5")
    assert r.returncode == 0, r.stderr
    selected = json.loads((out / "selected.json").read_text())
    assert len(selected) == 4 and all(s in rows for s in selected)
    r = run("select", str(out), "--ratio", "0.5", "--top-k", "2")
    assert r.returncode != 0 and "exactly one" in r.stderr
    r = run("score", str(tmp_path / "nope.json"), "-o", str(out), "--proxy", str(model_dir))
    assert r.returncode == 2 and "error:" in r.stderr
    r = run(
        "norms",
        str(data),
        "--proxy",
        str(model_dir),
        "--targets",
        "c_attn",
        "--check",
        "3",
        "-o",
        str(tmp_path / "n.jsonl"),
    )
    assert r.returncode == 0, r.stderr
    assert "max relative difference" in r.stdout
    norms = [json.loads(line) for line in (tmp_path / "n.jsonl").read_text().splitlines()]
    assert [n["index"] for n in norms] == list(range(8)) and all(n["grad_norm"] > 0 for n in norms)
