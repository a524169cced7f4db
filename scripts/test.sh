#!/usr/bin/env bash
# Installs what the tests need, then runs them. Extra arguments go to pytest.
# The tests marked `saebench` (skipped in .venv) then run in .venv-saebench, made on first use
# by scripts/saebench_env.sh (sae-bench pins numpy<2); HSAE_SAEBENCH=0 leaves them out.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh dev
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Test tensors are small: one thread avoids thread start-up costs (about 3x faster here).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/python -m ruff check src tests benchmarks scripts
status=0
.venv/bin/python -m pytest -q -W ignore::UserWarning "$@" || status=$?
if [ "${HSAE_SAEBENCH:-1}" != 0 ] &&
  .venv/bin/python -m pytest -q --collect-only "$@" -m saebench >/dev/null 2>&1; then
  bash scripts/saebench_env.sh
  HSAE_REQUIRE_SAEBENCH=1 .venv-saebench/bin/python -m pytest -q -W ignore::UserWarning \
    "$@" -m saebench || status=$?
fi
exit "$status"
