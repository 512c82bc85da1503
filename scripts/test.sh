#!/usr/bin/env bash
# Set up .venv and run the whole test suite (this is what .ci/run runs). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/tunegate models pull
exec .venv/bin/python -m pytest "$@"
