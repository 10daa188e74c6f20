#!/usr/bin/env bash
# GPU correctness checks and the benchmark grid in one call (budget: under 8 minutes).
# Run on a machine with a CUDA GPU from the repository root; results go to $OUT
# (default benchmarks/results/gpu-<date>).  Prints a short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv && .venv/bin/pip install -q torch triton && .venv/bin/pip install -q -e ".[dev]"
fi
PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
# 1. Kernels on the GPU against the float64 reference, bf16 included (about 1 minute).
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_reference.py \
  > "$OUT/kernel_tests.txt" 2>&1; echo "kernel tests rc=$?" | tee -a "$OUT/gpu.txt"
# 2. The public API with the Triton backend on a GPU model equals the reference backend.
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_engine.py -k "float32" \
  > "$OUT/engine_tests.txt" 2>&1; echo "engine tests rc=$?" | tee -a "$OUT/gpu.txt"
# 3. The benchmark grid (full sizes), JSON for the README table.
GRADFILTER_BENCH_FULL=1 timeout 270 $PY -m pytest -q -p no:cacheprovider benchmarks/bench_norms.py \
  --benchmark-json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1; echo "bench rc=$?" | tee -a "$OUT/gpu.txt"
[ -f "$OUT/bench.json" ] && $PY benchmarks/report.py "$OUT/bench.json" | tee "$OUT/table.md" | tail -40
cat "$OUT/gpu.txt"
