#!/usr/bin/env bash
# On the device machine, after the training wheel batches were copied to /tmp/dev/train (see
# ../shared/device/README.md): install them, then run bench/train.py with the arguments given.
set -euo pipefail
bash .device/install.sh /tmp/dev/train /tmp/site-train
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site-gw .whl/*.whl
fi
export PYTHONPATH=/tmp/site-train:/tmp/site-gw:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
exec python3 bench/train.py "$@"
