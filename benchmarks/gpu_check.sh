#!/usr/bin/env bash
# The GPU path end to end, in one call of under 7 minutes on a CUDA machine (docs/gpu.md):
#   tests    the Triton kernels compiled for CUDA against the float64 reference, bf16 included;
#   engine   per_example_grad_norms with the Triton backend against the reference backend;
#   bench-*  the benchmark cases the targets name (GPT-2-small-shaped, B=8, T=512 and 1024).
# Runs with this machine's python3 (or $PYTHON) as it is: no venv, nothing from the network.
# Results go to $OUT (default benchmarks/results/gpu-<date>): log.txt, summary.json (rewritten
# after every stage, so a timeout loses nothing), bench-*.json (one per invocation) and table.md.
# Every stage runs under its own time limit; the exit status is non-zero if any stage failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ -n "${TRITON_INTERPRET+set}" ]; then
  echo "gpu_check.sh: TRITON_INTERPRET is set; unset it: this checks the kernels compiled for CUDA" >&2
  exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  echo "gpu_check.sh: no CUDA: torch.cuda.is_available() is not true for $PY; run on a CUDA GPU" >&2
  exit 2
fi

OUT=${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
LOG=$OUT/log.txt
SUMMARY=$OUT/summary.json
export PY OUT PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 PIP_BREAK_SYSTEM_PACKAGES=1
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -ra)

summary() {  # init | probe | stage NAME RC SECONDS: update summary.json, written whole each time
  "$PY" - "$SUMMARY" "$@" <<'EOF'
import json, os, subprocess, sys, time
from importlib import metadata

path, what, *args = sys.argv[1:]
s = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": []}
if what != "init":
    with open(path) as f:
        s = json.load(f)
if what == "probe":
    import torch

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    props = torch.cuda.get_device_properties(0)
    s["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
                "sms": props.multi_processor_count, "count": torch.cuda.device_count()}
    smi = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    try:
        driver = subprocess.run(smi, capture_output=True, text=True).stdout.split("\n")[0]
    except OSError:
        driver = None
    s["versions"] = {"python": sys.version.split()[0], "torch": torch.__version__,
                     "cuda": torch.version.cuda, "driver": driver,
                     **{n: version(n) for n in ("triton", "transformers", "peft", "opacus",
                                                "gguf", "pytest", "pytest-benchmark")}}
elif what == "stage":
    name, rc, secs = args
    s["stages"].append({"name": name, "rc": int(rc), "wall_s": round(float(secs), 1)})
s["ok"] = all(st["rc"] == 0 for st in s["stages"])
with open(path + ".tmp", "w") as f:
    json.dump(s, f, indent=1)
os.replace(path + ".tmp", path)
EOF
}

FAILED=()
stage() {  # NAME SECONDS COMMAND...: run under a time limit, log it, record rc and wall time
  local name=$1 limit=$2 rc=0 t0
  shift 2
  t0=$(date +%s.%N)
  echo "=== $name (limit ${limit}s): $*" >>"$LOG"
  timeout -k 5 "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
  local secs
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
  summary stage "$name" "$rc" "$secs"
  printf '%-18s rc=%-3s %6.1fs\n' "$name" "$rc" "$secs" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || FAILED+=("$name")
}

# pyproject.toml installs kernels/ as gradfilter.kernels; in a plain checkout a link does that.
if [ ! -e gradfilter/kernels ]; then
  ln -s ../kernels gradfilter/kernels && trap 'rm -f gradfilter/kernels' EXIT
fi
setup() {  # Opacus and gguf from ../shared/wheels when missing; then check the imports
  local missing='import importlib.util as u, sys; sys.exit(all(map(u.find_spec, sys.argv[1:])))'
  if "$PY" -c "$missing" opacus gguf && compgen -G '../shared/wheels/*.whl' >/dev/null; then
    "$PY" -m pip install -q --no-deps --no-index ../shared/wheels/*.whl
  fi
  "$PY" -c 'import gradfilter.kernels.lora_norms, opacus, gguf'
}
export -f setup

summary init
nvidia-smi >>"$LOG" 2>&1 || true
stage setup 30 bash -c setup
summary probe || echo "could not read the GPU and versions" | tee -a "$LOG"

# (a) kernels on CUDA: fp32, fp16, bf16 against the float64 reference; the fused training op
stage tests-kernels 90 "${PYTEST[@]}" tests/test_kernels.py
stage tests-fused 60 "${PYTEST[@]}" tests/test_fused.py tests/test_reference.py
# (b) the public API on tiny CUDA models, Triton backend against the reference backend;
#     no host sync in the backward, and in a whole training step only its results
stage tests-engine 50 "${PYTEST[@]}" -m gpu tests/test_engine.py tests/test_syncs.py
# (b2) a whole scoring run on CUDA (--device cuda) on a tiny Llama proxy and the demo rows
score_run() {
  "$PY" - "$OUT/score-demo" <<'PYEOF'
import sys, tempfile
from gradfilter.cli import main
from gradfilter.io.models import tiny_llama, tiny_tokenizer
proxy = tempfile.mkdtemp()
tiny_llama(seed=0).save_pretrained(proxy)
tiny_tokenizer().save_pretrained(proxy)
sys.exit(main(["score", "-o", sys.argv[1], "--proxy", proxy, "--device", "cuda",
               "--norms", "inflight", "--no-progress", "--force"]))
PYEOF
}
export -f score_run
stage score-demo 30 bash -c score_run
# (c) the cases the targets name, one small invocation (and JSON) each
bench() {  # NAME SECONDS FILE -k-EXPRESSION [VAR=VALUE ...]
  local name=$1 limit=$2 file=$3 expr=$4
  shift 4
  stage "$name" "$limit" env "$@" "${PYTEST[@]}" "benchmarks/$file" -k "$expr" \
    --benchmark-json "$OUT/$name.json"
}
LAYER="test_layer_norm and (8-512-8- or 8-1024-8-)"
bench bench-layer-bf16 30 bench_norms.py "$LAYER" GRADFILTER_BENCH_DTYPE=bfloat16
bench bench-layer-fp32 20 bench_norms.py "$LAYER"
bench bench-model-512 50 bench_norms.py "test_model_norms and gpt2-12-8-512-" \
  GRADFILTER_BENCH_DTYPE=bfloat16
bench bench-model-1024 55 bench_norms.py "test_model_norms and gpt2-12-8-1024-" \
  GRADFILTER_BENCH_DTYPE=bfloat16
bench bench-fused 35 bench_fused.py "GPT-2-small-shaped and (5-8-512- or 5-8-1024-)"

report() {
  local runs=("$OUT"/bench-*.json)
  [ -e "${runs[0]}" ] || return 0
  { "$PY" benchmarks/report.py --targets "${runs[@]}" && echo &&
    "$PY" benchmarks/report.py "${runs[@]}"; } >"$OUT/table.md"
}
export -f report
stage report 5 bash -c report  # the stages' limits add up to 455 s

[ -f "$OUT/table.md" ] && sed '/^$/q' "$OUT/table.md"  # the targets table
echo "results: $OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED: ${FAILED[*]} (see $LOG)" >&2
  exit 1
fi
