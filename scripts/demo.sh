#!/usr/bin/env bash
# The main job, offline: harvest Gemma 3 270M activations from the built-in WordNet corpus,
# train a 4-level HSAE and its independent baseline, evaluate both and write the report.
# Extra arguments go to `hsae demo` (e.g. --out runs/mydemo).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/hsae demo "$@"
