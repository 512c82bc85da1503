#!/usr/bin/env bash
# On the device machine, after the vLLM batches were copied to /tmp/dev/vllm and the parity batches
# (bench/parity_device.txt) to /tmp/dev/parity: install them, then run bench/parity_device.py on the
# prepared data (.device/parity-data, made by bench/device_prep.sh).
#   usage: bash bench/parity_device.sh [parity_device.py run args]
set -euo pipefail
bash .device/install.sh /tmp/dev/vllm /tmp/site-vllm
bash .device/install.sh /tmp/dev/parity /tmp/site-parity
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site-gw .whl/*.whl
fi
export PYTHONPATH=/tmp/site-vllm:/tmp/site-gw:/tmp/site-parity:$PWD PYTHONUNBUFFERED=1
export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TUNEGATE_DATA_DIR=/tmp/tunegate-data
export TUNEGATE_VLLM_PYTHON=$(command -v python3) TUNEGATE_VLLM_DEVICE=gpu
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec python3 bench/parity_device.py run .device/parity-data "$@"
