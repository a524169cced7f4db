#!/usr/bin/env bash
# Creates .venv-saebench (once; reused while its stamp matches): the environment the SAEBench
# tests run in. sae-bench pins numpy<2, which the main .venv does not, so it lives apart:
# the CPU torch wheel first (as scripts/setup.sh does), then sae-bench and hsae (editable).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
ENV=.venv-saebench
TORCH=2.13.0
TORCHVISION=0.28.0  # the torchvision release of torch 2.13.0 (in sae-bench's requirements)
SAEBENCH=0.6.0
STAMP="torch $TORCH, torchvision $TORCHVISION, sae-bench $SAEBENCH, pyproject $(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$ENV/.hsae-ready" ] && [ "$(cat "$ENV/.hsae-ready")" = "$STAMP" ]; then
  exit 0
fi
started=$SECONDS
rm -f "$ENV/.hsae-ready"
if [ ! -x "$ENV/bin/python" ]; then
  "$PYTHON" -m venv "$ENV"
fi
"$ENV/bin/python" -m pip install -q --upgrade pip
if ! "$ENV/bin/python" -c "import torch" 2>/dev/null; then
  "$ENV/bin/python" -m pip install -q "torch==$TORCH"
fi
# Without these pins the resolver takes the newest torchvision and replaces the CPU torch with
# a CUDA build of a newer release (gigabytes of nvidia-* wheels).
printf 'torch==%s\ntorchvision==%s\n' "$TORCH" "$TORCHVISION" >"$ENV/constraints.txt"
"$ENV/bin/python" -m pip install -q -c "$ENV/constraints.txt" "sae-bench==$SAEBENCH" pytest -e ".[bench]"
# PyPI's torchvision is built against the CUDA torch: beside the CPU wheel its operators fail to
# register and `import transformers` models then fails. SAEBench never imports torchvision (it is
# only in its requirements) and transformers skips it when absent, so it goes.
"$ENV/bin/python" -m pip uninstall -q -y torchvision
"$ENV/bin/python" -c "import numpy, sae_bench.evals.core.main, transformer_lens"
echo "$STAMP" >"$ENV/.hsae-ready"
echo "created $ENV in $((SECONDS - started)) s"
