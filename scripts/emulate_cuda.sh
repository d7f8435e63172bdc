#!/usr/bin/env bash
# The test suite against the CUDA kernels run on the CPU by a warp emulator (scripts/cuda_emulator), for
# machines without a GPU: builds _C_emu (CUDA kernels and the torch layers' CUDA paths translated to host C++,
# registered for CPU tensors) and runs pytest on it. Extra arguments go to pytest.
#   scripts/emulate_cuda.sh [pytest args]
# Needs the venv of scripts/test.sh and the CUDA headers (a CUDA toolkit; no GPU, no nvcc run).
# R2LM_EMULATOR_ASAN=1 builds with AddressSanitizer: out-of-bounds accesses of the kernels abort the run.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
venv=${R2LM_VENV:-.venv}
[[ $venv = /* ]] || venv=$repo/$venv
py="$venv/bin/python"
"$py" -c "import torch" 2>/dev/null || { echo "emulate_cuda.sh: no venv with torch; run scripts/test.sh first"; exit 1; }
asan=${R2LM_EMULATOR_ASAN:-0}
build_dir=build/emulator
source scripts/asan_env.sh
flags=()
if [ "$asan" = 1 ]; then
  build_dir=build/emulator-asan
  flags=("${asan_cmake_options[@]}")
fi
PYTHON="$py" R2LM_BUILD_TARGET=_C_emu JOBS=${JOBS:-$(nproc)} scripts/dev_build.sh "$build_dir" OFF \
  -DR2LM_CUDA_EMULATOR=ON "${flags[@]}"
export R2LM_LIBRARY=$(ls "$build_dir"/_C_emu*.so)
[ "$asan" = 1 ] && asan_preload
# The GPU stress tests run too, on CPU tensors.
export R2LM_CUDA_STRESS_DEVICE=cpu PYTHONPATH="$repo:$repo/scripts${PYTHONPATH:+:$PYTHONPATH}"
# A kernel bug aborts the run; its description is kept in R2LM_EMULATOR_LOG (pytest captures stderr).
export R2LM_EMULATOR_LOG="$repo/$build_dir/emulator-failure.log"
rm -f "$R2LM_EMULATOR_LOG"
rc=0
"$py" -m pytest -p cuda_emulator.pytest_plugin -p no:cacheprovider "$@" || rc=$?  # testpaths: python_tests
[ -s "$R2LM_EMULATOR_LOG" ] && { echo "== the warp emulator stopped on:"; cat "$R2LM_EMULATOR_LOG"; }
exit $rc
