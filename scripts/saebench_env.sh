#!/usr/bin/env bash
# Creates .venv-saebench (once; reused while its stamp matches): the environment the SAEBench
# tests run in. sae-bench pins numpy<2, which the main .venv does not, so it lives apart:
# the CPU torch wheel first (as scripts/setup.sh does), then sae-bench and hsae (editable).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
ENV=.venv-saebench
TORCH=2.13.0
TORCHVISION=0.28.0  # the torchvision built against torch 2.13.0 (sae-bench needs torchvision)
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
"$ENV/bin/python" -m pip install -q -c "$ENV/constraints.txt" "sae-bench==$SAEBENCH" -e ".[dev]"
echo "$STAMP" >"$ENV/.hsae-ready"
echo "created $ENV in $((SECONDS - started)) s"
