#!/usr/bin/env bash
# Set up .venv and start the embedded system (engine, gateway, trainer worker, private Redis).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tunegate up "$@"
