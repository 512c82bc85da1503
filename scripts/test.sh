#!/usr/bin/env bash
# Set up .venv and run the whole test suite (this is what .ci/run runs). Extra args go to pytest.
# The vLLM contract lane (tests/vllm, marker `vllm`) needs .venv-vllm: scripts/setup_vllm_cpu.sh
# makes it (idempotent; ~2.5 min and 3.5 GB the first time). TUNEGATE_SKIP_VLLM=1 skips that
# step (the lane then skips too, or fails where CI=true).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [[ "${TUNEGATE_SKIP_VLLM:-0}" != "1" ]]; then
    bash scripts/setup_vllm_cpu.sh
fi
.venv/bin/tunegate models pull
exec .venv/bin/python -m pytest "$@"
