#!/usr/bin/env bash
# Installs what the tests need, then runs them. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh dev
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Test tensors are small: one thread avoids thread start-up costs (about 3x faster here).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/python -m ruff check src tests benchmarks scripts
.venv/bin/python -m pytest -q -W ignore::UserWarning "$@"
