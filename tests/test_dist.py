"""Runs across processes (torchrun, gloo on CPU): the same scores and selection as
one process, a resume with another number of processes refused, and the members'
split."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gradfilter.io.models import tiny_llama, tiny_tokenizer
from gradfilter.run.dist import Layout, World, choose_layout, member_share, split_rows

ROWS = [
    {
        "instruction": f"Add {i} and {i + 1}.",
        "output": f"The sum of {i} and {i + 1} is {2 * i + 1}.",
    }
    for i in range(24)
] + [{"instruction": "Say hi" * (k + 1), "output": "hi " * (3 * k + 1)} for k in range(16)]

ARGS = [
    "--rank", "2", "--alpha", "4", "--epochs", "2", "--batch-size", "4",
    "--max-length", "96", "--lr", "5e-3", "--norms", "inflight", "--token-budget", "200",
    "--no-progress", "--device", "cpu",
]  # fmt: skip


@pytest.mark.parametrize(
    "members, size, expected",
    [
        (5, 1, [[0, 1, 2, 3, 4]]),
        (5, 2, [[0, 1, 2], [3, 4]]),
        (5, 3, [[0, 1], [2, 3], [4]]),
        (4, 4, [[0], [1], [2], [3]]),
    ],
)
def test_members_are_split_in_contiguous_shares(members, size, expected):
    assert [member_share(members, World(r, size)) for r in range(size)] == expected


def test_more_processes_than_members_is_refused():
    with pytest.raises(ValueError, match="at most as many processes as members"):
        member_share(2, World(0, 3))


@pytest.mark.parametrize(
    "members, size, mode, expected",
    [
        (5, 1, "auto", Layout(1, 1)),
        (5, 2, "auto", Layout(2, 1)),
        (5, 5, "auto", Layout(5, 1)),
        (5, 6, "auto", Layout(3, 2)),
        (5, 7, "auto", Layout(1, 7)),
        (2, 4, "auto", Layout(2, 2)),
        (5, 2, "data", Layout(1, 2)),
        (5, 4, "member", Layout(4, 1)),
        (4, 6, "2x3", Layout(2, 3)),
    ],
)
def test_the_layout_of_processes(members, size, mode, expected):
    layout = choose_layout(members, size, mode)
    assert layout == expected and layout.size == size
    shares = [layout.share(members, r) for r in range(size)]
    # each member group holds a contiguous share, every member exactly once
    assert sorted(m for g in range(layout.groups) for m in shares[g * layout.data]) == list(
        range(members)
    )
    for r in range(size):
        assert shares[r] == shares[layout.group(r) * layout.data]


@pytest.mark.parametrize(
    "members, size, mode, message",
    [
        (2, 3, "member", "at most as many processes as members"),
        (5, 4, "3x2", "needs 6 processes"),
        (2, 3, "3x1", "3 member groups for 2 members"),
        (5, 2, "rows", "parallel must be"),
        (5, 2, "0x2", "parallel must be"),
    ],
)
def test_a_layout_that_cannot_hold_the_run_is_refused(members, size, mode, message):
    with pytest.raises(ValueError, match=message):
        choose_layout(members, size, mode)


def test_a_batch_is_split_in_contiguous_parts_that_cover_it():
    for n in range(0, 12):
        for parts in range(1, 5):
            got = [split_rows(n, parts, p) for p in range(parts)]
            assert got[0][0] == 0 and got[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(got, got[1:], strict=False))
            sizes = [b - a for a, b in got]
            assert max(sizes) - min(sizes) <= 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    proxy = folder / "proxy"
    tiny_llama(seed=0).save_pretrained(proxy)
    tiny_tokenizer().save_pretrained(proxy)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return folder, proxy, data


def _gradfilter(args, nproc=None, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    launch = [sys.executable, "-m"]
    if nproc:
        launch += ["torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
        launch += ["-m"]  # torchrun ... -m gradfilter
    done = subprocess.run(
        [*launch, "gradfilter", *args], env=env, capture_output=True, text=True, timeout=900
    )
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def _scores(out):
    return [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_gives_the_single_process_scores(setup, nproc):
    folder, proxy, data = setup
    one = folder / "one"
    if not (one / "scores.jsonl").exists():
        _gradfilter(["score", str(data), "-o", str(one), "--proxy", str(proxy), *ARGS])
    many = folder / f"many-{nproc}"
    stream = ["--stream"] if nproc == 3 else []  # each process streams into its own store
    done = _gradfilter(
        ["score", str(data), "-o", str(many), "--proxy", str(proxy), *ARGS, *stream], nproc=nproc
    )
    assert "member-parallel across" in done.stderr
    if stream:
        assert {f"rows.rank{r}" for r in range(nproc)} <= set(os.listdir(many))
    a, b = _scores(one), _scores(many)
    assert len(a) == len(b) == len(ROWS)
    # Each member trains as in one process (same batches, padding, chunks, dropout
    # masks); its norms agree to float32 rounding, not bit for bit.
    import numpy as np

    ga = np.array([r["gsnr"] for r in a], dtype=float)
    gb = np.array([r["gsnr"] for r in b], dtype=float)
    np.testing.assert_allclose(gb, ga, rtol=1e-5)
    assert [r["rank"] for r in a] == [r["rank"] for r in b]
    run = json.loads((many / "run.json").read_text())
    assert run["plan"]["parallel"]["processes"] == nproc
    assert sorted(os.listdir(many)).count(f"checkpoint-rank0-of-{nproc}.pt") == 1
    n1, n2 = np.load(one / "norms.npz"), np.load(many / "norms.npz")
    np.testing.assert_allclose(n2["sq"], n1["sq"], rtol=1e-5)
    assert np.array_equal(n1["visit_step"], n2["visit_step"])
    # Resuming the folder with another number of processes is refused, not mixed.
    again = _gradfilter(
        ["score", str(data), "-o", str(many), "--proxy", str(proxy), *ARGS], check=False
    )
    assert again.returncode == 2
    assert "another number of processes" in again.stderr


@pytest.mark.parametrize(
    "nproc, parallel, extra, says",
    [
        (2, "data", [], "data-parallel across 2"),
        # uneven: batches of 4 rows in parts of 2/1/1, and a 2-row step leaves one
        # process without rows (it still takes part in the gradient sum)
        (3, "data", ["--norms", "snapshot"], "data-parallel across 3"),
        (4, "2x2", ["--members", "4", "--norms", "snapshot"], "2 member groups"),
    ],
)
def test_data_parallel_gives_the_single_process_scores(setup, nproc, parallel, extra, says):
    import numpy as np

    folder, proxy, data = setup
    common = ["score", str(data), "--proxy", str(proxy), *ARGS, *extra]
    one = folder / ("one" + "".join(extra))
    if not (one / "scores.jsonl").exists():
        _gradfilter([*common, "-o", str(one)])
    many = folder / f"dp-{nproc}-{parallel}"
    done = _gradfilter([*common, "-o", str(many), "--parallel", parallel], nproc=nproc)
    assert says in done.stderr
    a, b = _scores(one), _scores(many)
    assert [(r["index"], r["id"]) for r in a] == [(r["index"], r["id"]) for r in b]
    # The gradients of a step are summed over processes, not within one: float32
    # rounding, not bit for bit.
    ga = np.array([np.nan if r["gsnr"] is None else r["gsnr"] for r in a])
    gb = np.array([np.nan if r["gsnr"] is None else r["gsnr"] for r in b])
    assert np.isfinite(ga).sum() > 20
    np.testing.assert_allclose(gb, ga, rtol=1e-4)
    assert [r["rank"] for r in a] == [r["rank"] for r in b]
    n1, n2 = np.load(one / "norms.npz"), np.load(many / "norms.npz")
    np.testing.assert_allclose(n2["sq"], n1["sq"], rtol=1e-4)
    assert np.array_equal(n1["visit_step"], n2["visit_step"])
    r1, r2 = (json.loads((d / "run.json").read_text()) for d in (one, many))
    np.testing.assert_allclose(r2["final_losses"], r1["final_losses"], rtol=1e-5)
    assert r2["tokens_processed"] == r1["tokens_processed"]  # each row counted once
    layout = r2["plan"]["parallel"]
    assert layout["processes"] == layout["member_groups"] * layout["processes_per_group"] == nproc


def _killed_rank(rank, size, port, data, out, proxy, parallel="auto", seconds=60.0):
    """One process of a run stopped (as if killed) after two training steps."""
    os.environ.update(
        WORLD_SIZE=str(size), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
    )  # fmt: skip
    from gradfilter.run.score import ScoreConfig, score

    config = ScoreConfig(
        proxy=str(proxy), rank=2, alpha=4, epochs=2, batch_size=4, max_length=96, lr=5e-3,
        norms="inflight", token_budget=200, device="cpu", parallel=parallel,
        checkpoint_seconds=seconds,
    )  # fmt: skip
    try:
        score(str(data), str(out), config, progress=False, log=lambda s: None, stop_after=3)
    except KeyboardInterrupt:
        return


def test_a_killed_torchrun_run_resumes_to_the_same_scores(setup):
    import socket

    import torch.multiprocessing as mp

    folder, proxy, data = setup
    out = folder / "killed"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_killed_rank, args=(2, port, data, out, proxy), nprocs=2, join=True)
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == [
        "checkpoint-rank0-of-2.pt",
        "checkpoint-rank1-of-2.pt",
    ]
    assert not (out / "scores.jsonl").exists()
    done = _gradfilter(["score", str(data), "-o", str(out), "--proxy", str(proxy), *ARGS], nproc=2)
    assert "resuming from" in done.stderr
    full = folder / "many-2"
    if not (full / "scores.jsonl").exists():
        _gradfilter(["score", str(data), "-o", str(full), "--proxy", str(proxy), *ARGS], nproc=2)
    assert _scores(out) == _scores(full)


def test_a_data_parallel_process_one_checkpoint_behind_resumes_with_its_group(setup):
    """A data-parallel group saves together, and keeps the checkpoint before; a
    process killed while saving holds only the one before.  The group resumes from
    the step all its processes have, to the uninterrupted run's scores."""
    import socket

    import torch.multiprocessing as mp

    folder, proxy, data = setup
    out = folder / "dp-behind"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_killed_rank, args=(2, port, data, out, proxy, "data", 0.0), nprocs=2, join=True)
    behind = out / "checkpoint-rank1-of-2.pt"
    assert (out / "checkpoint-rank0-of-2.pt.prev").exists()
    os.replace(str(behind) + ".prev", behind)  # rank 1 lost its last save
    args = ["score", str(data), "--proxy", str(proxy), *ARGS, "--parallel", "data"]
    done = _gradfilter([*args, "-o", str(out)], nproc=2)
    assert "resuming from" in done.stderr and "epoch 0, step 2," in done.stderr
    full = folder / "dp-2-data"
    if not (full / "scores.jsonl").exists():
        _gradfilter([*args, "-o", str(full)], nproc=2)
    assert _scores(out) == _scores(full)


def _workers(agent: int) -> dict[int, int]:
    """``{RANK: pid}`` of the worker processes below a torchrun agent."""
    found: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != agent:
                continue
            with open(f"/proc/{name}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if b"RANK" in env:
            found[int(env[b"RANK"])] = int(name)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the ranks through /proc")
@pytest.mark.parametrize("parallel", ["member", "data"])
def test_kill_9_of_one_rank_and_the_same_torchrun_command_resumes(setup, parallel):
    """SIGKILL of rank 1 mid-run: torchrun stops the run; the same command resumes
    from each rank's last checkpoint to the uninterrupted run's scores."""
    import signal
    import time

    folder, proxy, data = setup
    out = folder / f"kill9-{parallel}"
    args = ["score", str(data), "-o", str(out), "--proxy", str(proxy), *ARGS]
    args += ["--checkpoint-seconds", "0", "--parallel", parallel]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launch += ["--nproc-per-node", "2", "-m", "gradfilter"]
    agent = subprocess.Popen(
        [*launch, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    ckpts = [out / "checkpoint-rank0-of-2.pt", out / "checkpoint-rank1-of-2.pt"]
    deadline = time.time() + 600
    while agent.poll() is None and time.time() < deadline and not all(c.exists() for c in ckpts):
        time.sleep(0.05)
    time.sleep(0.3)
    ranks = _workers(agent.pid)
    assert agent.poll() is None and 1 in ranks, "the run ended before it could be killed"
    os.kill(ranks[1], signal.SIGKILL)
    agent.wait(timeout=600)
    assert agent.returncode != 0
    assert not (out / "scores.jsonl").exists()
    done = _gradfilter(args, nproc=2)
    assert "resuming from" in done.stderr
    full = folder / ("many-2" if parallel == "member" else "dp-2-data")
    if not (full / "scores.jsonl").exists():
        _gradfilter(
            ["score", str(data), "-o", str(full), "--proxy", str(proxy), *ARGS]
            + ["--parallel", parallel],
            nproc=2,
        )
    assert _scores(out) == _scores(full)


def test_a_share_of_the_members_computes_the_whole_folds_norms_bitwise(monkeypatch):
    """In one process, members 3-4 trained alone (as rank 1 of 2 would) give the
    very norms they get inside the five-member fold (fails, e.g., if a share took
    the wrong members' seeds).  The tiny model uses eager attention; the proxy's
    sdpa rounds differently for another batch size (docs/scale-out.md)."""
    import numpy as np

    from gradfilter.run import score as S
    from gradfilter.run.dist import World

    monkeypatch.setattr(S, "gather", lambda world, value: [value])
    monkeypatch.setattr(S, "agree", lambda *args: None)
    config = S.ScoreConfig(
        rank=2, alpha=4, epochs=2, batch_size=4, max_length=96, lr=5e-3,
        norms="inflight", token_budget=200, device="cpu",
    )  # fmt: skip

    def late(world, share):
        model, tok = tiny_llama(seed=0), tiny_tokenizer()
        assert model.config._attn_implementation == "eager"
        prepared = S.prepare(ROWS, config, tok)
        work = S.plan(config, prepared)
        records, _, _ = S._score_ensemble(
            config, model, tok, prepared, work, None, lambda s: None, False, None, {},
            world, share,
        )  # fmt: skip
        width = len(share) if share else config.members
        return np.array([r["late_sq"] or [np.nan] * width for r in records], dtype=np.float64)

    whole = late(World(), None)
    part = late(World(1, 2), [3, 4])
    assert np.isfinite(part).sum() > 0
    assert np.array_equal(whole[:, 3:], part, equal_nan=True)
