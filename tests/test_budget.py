"""The automatic token budget: sized from the memory at hand (injected here), never
above it; rows that cannot fit get a status; the choice is in run.json."""

from __future__ import annotations

import json

import pytest

from gradfilter.io.models import tiny_gpt2, tiny_tokenizer
from gradfilter.run import budget as budget_mod
from gradfilter.run.budget import (
    SAFETY_FRACTION,
    auto_token_budget,
    memory_model,
)
from gradfilter.run.score import ScoreConfig, prepare, score

GiB = 1 << 30


@pytest.mark.parametrize("available", [0.05 * GiB, 0.3 * GiB, 1 * GiB, 7.5 * GiB, 64 * GiB])
@pytest.mark.parametrize("members", [1, 5])
def test_auto_budget_fits_the_memory_it_is_given(available, members):
    model = tiny_gpt2(n_positions=128)
    available = int(available)
    choice = auto_token_budget(model, members, 4, available=available)
    mm = memory_model(model, members, 4)
    limit = SAFETY_FRACTION * available
    tokens = choice.token_budget
    assert mm.training_bytes(tokens) - mm.weights <= limit
    assert mm.norm_pass_bytes(tokens) - mm.weights <= limit
    # ... and it is the largest round budget that does.
    assert mm.adapters + mm.fixed + mm.per_token * (tokens + 64) > limit
    assert choice.how == "auto" and choice.available_bytes == available
    assert "auto" in choice.describe() and str(tokens) in choice.describe()


def test_per_token_cost_grows_with_width_and_members_cost_adapters():
    small = memory_model(tiny_gpt2(n_embd=32), 5, 4)
    wide = memory_model(tiny_gpt2(n_embd=64), 5, 4)
    assert wide.per_token > small.per_token > 0
    assert memory_model(tiny_gpt2(n_embd=32), 1, 4).adapters * 5 == small.adapters


def test_too_little_memory_is_a_clear_error():
    with pytest.raises(ValueError, match="not enough memory for any folded pass.*--token-budget"):
        auto_token_budget(tiny_gpt2(), 5, 4, available=1000)


ROWS = [
    {"instruction": "Say yes.", "input": "", "output": "Yes."},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Count to three.", "input": "", "output": "1, 2, 3."},
    {
        "instruction": "Tell me about rivers.",
        "input": "",
        "output": "Rivers flow downhill to the sea.",
    },
]
CFG = dict(members=3, rank=4, alpha=8, epochs=2, batch_size=2, max_length=120, lr=5e-3)


def test_unfittable_row_gets_a_status_and_the_choice_is_recorded(tmp_path, monkeypatch):
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(ROWS), encoding="utf-8")
    model, tok = tiny_gpt2(n_positions=128), tiny_tokenizer()
    lengths = prepare(ROWS, ScoreConfig(**CFG), tok).lengths
    assert max(lengths[:3]) * 3 < 192 < lengths[3] * 3
    mm = memory_model(model, 3, 4)
    # Memory for 220 folded tokens (a budget of 192) with what a fast run's allocator
    # keeps: the long row cannot fit even alone.
    held = (mm.adapters + mm.fixed + 220 * mm.per_token) * budget_mod.HEAP_OVERHEAD
    available = int(held / SAFETY_FRACTION)
    monkeypatch.setattr(budget_mod, "available_memory", lambda device="cpu": available)
    said = []
    out = tmp_path / "out"
    res = score(
        str(data),
        str(out),
        ScoreConfig(**CFG),
        progress=False,
        log=said.append,
        model_and_tokenizer=(model, tok),
    )
    budget = res.run["token_budget"]
    assert budget["how"] == "auto" and budget["available_bytes"] == available
    assert 3 * max(lengths[:3]) <= budget["token_budget"] < 3 * lengths[3]
    assert res.run["config"]["token_budget"] == budget["token_budget"]
    assert any(f"token budget {budget['token_budget']} (auto" in s for s in said)
    status = [r["status"] for r in res.records]
    assert status[:3] == ["ok"] * 3
    assert status[3].startswith("too long for the memory at hand")
    assert res.records[3]["gsnr"] is None
    run = json.loads((out / "run.json").read_text())
    assert run["token_budget"]["token_budget"] == budget["token_budget"]

    # A run of the same settings in the same folder is the same run (not "other settings").
    monkeypatch.setattr(budget_mod, "available_memory", lambda device="cpu": 2 * available)
    again = score(
        str(data), str(out), ScoreConfig(**CFG), progress=False, model_and_tokenizer=(model, tok)
    )
    assert [r["status"] for r in again.records] == status


def test_resumed_run_keeps_its_automatic_budget(tmp_path, monkeypatch):
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(ROWS[:3] * 2), encoding="utf-8")
    model, tok = tiny_gpt2(n_positions=128), tiny_tokenizer()
    mm = memory_model(model, 3, 4)
    held = (mm.adapters + mm.fixed + 200 * mm.per_token) * budget_mod.HEAP_OVERHEAD
    available = int(held / SAFETY_FRACTION)
    monkeypatch.setattr(budget_mod, "available_memory", lambda device="cpu": available)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        score(
            str(data),
            str(out),
            ScoreConfig(**CFG),
            progress=False,
            model_and_tokenizer=(model, tok),
            stop_after=2,
        )
    first = auto_token_budget(
        model, 3, 4, available=available, overhead=budget_mod.HEAP_OVERHEAD
    ).token_budget
    monkeypatch.setattr(budget_mod, "available_memory", lambda device="cpu": 50 * available)
    res = score(
        str(data), str(out), ScoreConfig(**CFG), progress=False, model_and_tokenizer=(model, tok)
    )
    assert res.run["token_budget"] == {
        **res.run["token_budget"],
        "how": "resumed",
        "token_budget": first,
    }
    assert all(r["status"] == "ok" for r in res.records)


def test_budget_settings_are_checked():
    with pytest.raises(ValueError, match="token_budget must be an integer >= 0"):
        ScoreConfig(token_budget=-5).validate()
    ScoreConfig(token_budget=0).validate()  # 0: no limit
    ScoreConfig(token_budget=None).validate()  # automatic


@pytest.mark.parametrize("available", [0.3 * GiB, 7.5 * GiB])
def test_a_fast_run_plans_for_the_memory_the_allocator_keeps(available):
    """With freed memory kept for reuse (host_memory "fast"), the planned bytes
    times HEAP_OVERHEAD stay within the usable memory."""
    model = tiny_gpt2(n_positions=128)
    available = int(available)
    lean = auto_token_budget(model, 5, 4, available=available)
    fast = auto_token_budget(model, 5, 4, available=available, overhead=budget_mod.HEAP_OVERHEAD)
    mm = memory_model(model, 5, 4)
    limit = SAFETY_FRACTION * available
    used = mm.norm_pass_bytes(fast.token_budget) - mm.weights
    assert used * budget_mod.HEAP_OVERHEAD <= limit
    assert (used + 64 * mm.per_token) * budget_mod.HEAP_OVERHEAD > limit  # the largest
    assert fast.token_budget < lean.token_budget
    assert "--host-memory fast" in fast.describe() and "host-memory" not in lean.describe()


def test_host_memory_settings(monkeypatch):
    import platform

    with pytest.raises(ValueError, match="fast or lean"):
        budget_mod.set_host_memory("small")
    with pytest.raises(ValueError, match="host_memory must be fast or lean"):
        ScoreConfig(host_memory="small").validate()
    assert "host_memory" not in ScoreConfig().identity()  # same scores either way
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert budget_mod.set_host_memory("lean") is True
        assert budget_mod.set_host_memory("fast") is True  # glibc's largest dynamic values
    monkeypatch.setenv("GRADFILTER_MALLOC_TUNING", "0")
    assert budget_mod.set_host_memory("lean") is False


def test_fast_and_lean_runs_write_the_same_scores(tmp_path):
    cfg = dict(members=3, rank=4, alpha=8, batch_size=2, max_length=64, token_budget=256)
    for mode in ("lean", "fast"):
        proxy = (tiny_gpt2(n_positions=128), tiny_tokenizer())
        score(ROWS * 3, str(tmp_path / mode), ScoreConfig(**cfg, host_memory=mode),
              progress=False, model_and_tokenizer=proxy)  # fmt: skip
    assert (tmp_path / "lean" / "scores.jsonl").read_bytes() == (
        tmp_path / "fast" / "scores.jsonl"
    ).read_bytes()
    run = json.loads((tmp_path / "fast" / "run.json").read_text())
    assert run["config"]["host_memory"] == "fast"


def test_return_freed_memory_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("GRADFILTER_MALLOC_TUNING", "0")
    assert budget_mod.return_freed_memory() is False
    monkeypatch.delenv("GRADFILTER_MALLOC_TUNING")
    import platform

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert budget_mod.return_freed_memory() is True


def test_processes_on_one_machine_share_its_memory(monkeypatch):
    """Under torchrun each CPU process on a machine plans with its share of the
    memory (LOCAL_WORLD_SIZE), not all of it."""
    from gradfilter.run.budget import pick_token_budget

    model = tiny_gpt2(n_positions=128)
    monkeypatch.setattr(budget_mod, "available_memory", lambda device="cpu": GiB // 16)
    config = ScoreConfig(members=2, rank=4, batch_size=64, max_length=128)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = pick_token_budget(config, model)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    shared = pick_token_budget(config, model)
    assert alone.available_bytes == GiB // 16 and shared.available_bytes == GiB // 64
    assert shared.token_budget < alone.token_budget


def test_a_torchrun_run_resumes_with_its_automatic_budget(tmp_path):
    """The budget of an interrupted run is read back from any process's checkpoint."""
    import torch

    from gradfilter.run.budget import _resumed_budget

    config = ScoreConfig(**CFG)
    identity = {"config": {**config.identity(), "token_budget": 448}}
    torch.save({"identity": identity}, tmp_path / "checkpoint-rank0-of-2.pt")
    assert _resumed_budget(str(tmp_path), config) == 448
    assert _resumed_budget(str(tmp_path / "none"), config) is None
