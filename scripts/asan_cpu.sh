#!/usr/bin/env bash
# The test suite against a CPU build compiled with AddressSanitizer (build/cpu-asan): an out-of-bounds access
# of a CPU kernel aborts the run with its report. Extra arguments go to pytest.
#   scripts/asan_cpu.sh [pytest args]
# Needs the venv of scripts/test.sh. AMX tile loads and stores are not instrumented (inline assembly).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
venv=${R2LM_VENV:-.venv}
[[ $venv = /* ]] || venv=$repo/$venv
py="$venv/bin/python"
"$py" -c "import torch" 2>/dev/null || { echo "asan_cpu.sh: no venv with torch; run scripts/test.sh first"; exit 1; }
build_dir=build/cpu-asan
source scripts/asan_env.sh
PYTHON="$py" JOBS=${JOBS:-$(nproc)} scripts/dev_build.sh "$build_dir" OFF "${asan_cmake_options[@]}"
asan_preload
export R2LM_LIBRARY=$(ls "$build_dir"/_C*.so) PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# The source tree's package with the sanitized extension.
"$py" -m pytest python_tests -p no:cacheprovider "$@"
