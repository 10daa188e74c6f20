"""Resident memory of a scoring run over time, sampled every 10 s (not a timed test).

    python benchmarks/rss_trace.py fast|lean ROWS

Runs the default run (SmolLM2-135M, bfloat16, 5 members, 2 epochs, max length
256) with ``--norms inflight``, token budget 2048 and the given
``--host-memory``, on the first ROWS Alpaca rows, and prints the wall time and
``(seconds, VmRSS GiB)`` samples: whether the peak keeps growing through the run.
"""

import json
import sys
import tempfile
import threading
import time

import torch

from gradfilter.io.models import load_proxy
from gradfilter.run.score import ScoreConfig, score

mode, n = sys.argv[1], int(sys.argv[2])
with open("../shared/data/alpaca_9k.json", encoding="utf-8") as f:
    rows = json.load(f)[:n]
proxy = load_proxy(None, dtype=torch.bfloat16)
samples = []


def rss() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 2**20


stop = False


def watch() -> None:
    t0 = time.time()
    while not stop:
        samples.append((round(time.time() - t0), round(rss(), 2)))
        time.sleep(10)


threading.Thread(target=watch, daemon=True).start()
cfg = ScoreConfig(
    dtype="bfloat16", max_length=256, token_budget=2048, host_memory=mode, norms="inflight"
)
with tempfile.TemporaryDirectory() as out:
    t = time.perf_counter()
    score(rows, out, cfg, progress=False, log=lambda s: None, model_and_tokenizer=proxy)
    print(mode, n, "wall", round(time.perf_counter() - t, 1))
stop = True
print(samples)
