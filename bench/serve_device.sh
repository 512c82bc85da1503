#!/usr/bin/env bash
# On the device machine, after the vLLM wheel batches were copied to /tmp/dev/vllm (see
# ../shared/device/README.md): install them, then run bench/serve_device.py with the arguments given.
#   usage: bash bench/serve_device.sh [serve_device.py args]
#          bash bench/serve_device.sh --ab-lora-meta [lora_meta_device.py args]
#          bash bench/serve_device.sh --fold-kernels [lora_fold_device.py args]
set -euo pipefail
bash .device/install.sh /tmp/dev/vllm /tmp/site-vllm
# Gateway dependencies that the device image lacks travel as wheels in .whl (bench/device_prep.sh makes them).
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site-gw .whl/*.whl
fi
export PYTHONPATH=/tmp/site-vllm:/tmp/site-gw:$PWD PYTHONUNBUFFERED=1
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_ALLOW_RUNTIME_LORA_UPDATING=True HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
script=bench/serve_device.py
if [ "${1:-}" = "--ab-lora-meta" ]; then script=bench/lora_meta_device.py; shift; fi
if [ "${1:-}" = "--fold-kernels" ]; then shift; exec python3 bench/lora_fold_device.py "$@"; fi
exec python3 "$script" --tokenizer .device/tok "$@"
