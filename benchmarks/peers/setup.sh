#!/usr/bin/env bash
# Creates .venv-peers at the repository root: PyTorch (CPU), BackPACK, JAX (CPU).
# Usage: bash benchmarks/peers/setup.sh
#   PYTHON=python3.11      the interpreter for the venv (default python3)
#   TORCH_INDEX_URL=...    an extra index holding the CPU torch wheel (default:
#                          none, pip's configured indexes and find-links, which
#                          on the project's machines hold torch 2.13.0+cpu)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
here="$root/benchmarks/peers"
venv="$root/.venv-peers"
torch_index="${TORCH_INDEX_URL-}"
"${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
# 1. torch, CPU build, alone (its dependencies come from PyPI in step 2).
"${pip[@]}" install --no-deps "torch==2.13.0" ${torch_index:+--extra-index-url "$torch_index"}
# 2. everything else (torch is already satisfied).
"${pip[@]}" install -r "$here/requirements.txt"
# 3. BackPACK without its declared torchvision dependency: only
#    backpack/utils/examples.py (MNIST example loaders) imports torchvision.
"${pip[@]}" install --no-deps backpack-for-pytorch==1.7.1
"$venv/bin/python" - <<'PY'
import sys
import torch, jax, backpack, einops, unfoldNd  # noqa: F401
from backpack import backpack as _ctx, extend  # noqa: F401
from backpack.extensions import BatchGrad  # noqa: F401
assert "torchvision" not in sys.modules, "torchvision was imported"
assert not torch.version.cuda, f"torch is a CUDA build ({torch.version.cuda})"
print("peers ok: torch", torch.__version__, "jax", jax.__version__)
PY
