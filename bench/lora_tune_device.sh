#!/usr/bin/env bash
# On the device machine, after the vLLM wheel batches were copied to /tmp/dev/vllm (see
# ../shared/device/README.md): install them, then tune vLLM's LoRA kernels for the
# Llama-3.1-8B shape (engine/lora_kernels.py) with the arguments given.
#   usage: bash bench/lora_tune_device.sh --out DIR [engine/lora_kernels.py args]
set -euo pipefail
bash .device/install.sh /tmp/dev/vllm /tmp/site-vllm
export PYTHONPATH=/tmp/site-vllm:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec python3 -m engine.lora_kernels --shape llama-3.1-8b "$@"
