#!/usr/bin/env bash
# On the device machine, after the vLLM wheel batches were copied to /tmp/dev/vllm (see
# ../shared/device/README.md): install them, then tune vLLM's LoRA kernels for the
# Llama-3.1-8B shape (engine/vllm/tune_lora.py) with the arguments given.
#   usage: bash bench/lora_tune_device.sh --out DIR [engine/vllm/tune_lora.py args]
set -euo pipefail
bash .device/install.sh /tmp/dev/vllm /tmp/site-vllm
export PYTHONPATH=/tmp/site-vllm:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec python3 -m engine.vllm.tune_lora --shape llama-3.1-8b "$@"
