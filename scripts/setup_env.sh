#!/usr/bin/env bash
# Creates .venv (if needed), installs torch and the build/test tools when missing, and builds + installs
# r2lm_kernels from source into it. Sourced by scripts/test.sh and scripts/demo.sh.
#   R2LM_CUDA=AUTO|ON|OFF   build the CUDA kernels (AUTO: when nvcc and a CUDA torch are found)
#   R2LM_CUDA_ARCHS="80;90a" CUDA architectures
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
venv=${R2LM_VENV:-.venv}  # relative to the repository, or absolute
if [ ! -x "$venv/bin/python" ]; then
  echo "== creating $venv"
  python3 -m venv "$venv"
fi
[[ $venv = /* ]] || venv=$repo/$venv
py="$venv/bin/python"
if ! "$py" -c "import torch" 2>/dev/null; then
  # 2.14.1 is the CUDA 13 build kept on this machine kind's local disk (about a minute to install).
  echo "== installing torch"
  "$py" -m pip install -q "torch==2.14.1"
fi
"$py" -m pip install -q numpy pytest pytest-benchmark "scikit-build-core>=0.10" transformers safetensors
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
command -v ccache >/dev/null 2>&1 && export CCACHE_BASEDIR="$repo" CCACHE_NOHASHDIR=1
echo "== building r2lm_kernels (R2LM_CUDA=${R2LM_CUDA:-AUTO})"
# --no-build-isolation: build against the torch installed above; an isolated build would fetch another torch.
"$py" -m pip install -q --no-build-isolation --no-deps "$repo"
(cd / && "$py" -c "import r2lm_kernels as r; print('== r2lm_kernels built:', r.compiled_backends())")
