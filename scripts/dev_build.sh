#!/usr/bin/env bash
# Incremental developer build without pip: compiles the extension into a build folder of its own.
#   scripts/dev_build.sh [BUILD_DIR] [R2LM_CUDA=AUTO|ON|OFF] [cmake configure options...]
# then, from the repository root: R2LM_LIBRARY=$(ls BUILD_DIR/_C*.so) .venv/bin/python -m pytest python_tests/...
# The folder is configured again when R2LM_CUDA, PYTHON or the options differ from its last configure;
# R2LM_BUILD_TARGET builds one target (default: all).
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${1:-build/dev}
cuda=${2:-${R2LM_CUDA:-OFF}}
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || { echo "dev_build.sh: no Python at $py: run scripts/test.sh (creates .venv) or set PYTHON"; exit 1; }
export CCACHE_BASEDIR=$PWD CCACHE_NOHASHDIR=1
gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
configure=(-DR2LM_CUDA="$cuda" -DPython_EXECUTABLE="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")" "${@:3}")
stamp="$build_dir/.dev_build_configure"
# A configure that failed leaves a cache but no build files (and no stamp): configure again then.
if { [ ! -f "$build_dir/build.ninja" ] && [ ! -f "$build_dir/Makefile" ]; } ||
   [ "$(cat "$stamp" 2>/dev/null)" != "${configure[*]}" ]; then
  rm -f "$stamp"
  cmake -S . -B "$build_dir" "${gen[@]}" "${configure[@]}" >/dev/null
  echo "${configure[*]}" > "$stamp"
fi
target=()
[ -n "${R2LM_BUILD_TARGET:-}" ] && target=(--target "$R2LM_BUILD_TARGET")
cmake --build "$build_dir" "${target[@]}" -j "${JOBS:-2}"
ls "$build_dir"/_C*.so
