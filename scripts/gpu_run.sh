#!/usr/bin/env bash
# The one-call GPU run, for a bare GPU machine with no network (torch, triton, cmake, ninja, pybind11,
# scikit-build-core, pytest, pytest-benchmark installed): builds the extension for the local GPU's
# architecture, runs the whole test suite, the microbenchmarks and the end-to-end throughput, and writes
# everything into OUT_DIR; ends with a short summary (also OUT_DIR/summary.txt). Plans for less than 9
# minutes in all. BUNDLE, when given, is a .tar.gz that OUT_DIR is packed into at exit, also after a failed
# stage: one file to bring back from a machine that returns only a few. Every stage runs even when an
# earlier one failed; the exit code is then the last failed stage's, or 3 for a stage cut at its time limit.
#   scripts/gpu_run.sh OUT_DIR [BUNDLE]      e.g. scripts/gpu_run.sh /tmp/gpu_run "$OUT/gpu_run.tar.gz"
# Stage budgets (seconds; environment): R2LM_BUILD_S=240 R2LM_TEST_S=170 R2LM_MICRO_S=200 (at most half of
# what is left), the e2e gets the rest of R2LM_TOTAL_S=530. PYTHON=python3 picks the interpreter.
# R2LM_TEST_K="not cpu" selects the tests (pytest -k): the CUDA ones and those of no device; the CPU kernels'
# are CI's on every commit, and run here they would double the stage (R2LM_TEST_K="" runs all).
# A dry run of the script's plumbing on a machine without a GPU: R2LM_DEVICE=cpu R2LM_LIBRARY=<dev build .so>
# (skips the pip build and uses the source tree with that extension).
set -uo pipefail
out=$(realpath -m "${1:?usage: scripts/gpu_run.sh OUT_DIR [BUNDLE]}")
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
mkdir -p "$out"
if [ -n "${2:-}" ]; then
  bundle=$(realpath -m "$2")
  trap 'tar -czf "$bundle" -C "$(dirname "$out")" "$(basename "$out")" && echo "== packed $out into $bundle"' EXIT
fi
[ -n "${R2LM_LIBRARY:-}" ] && R2LM_LIBRARY=$(realpath "$R2LM_LIBRARY")
# Everything runs outside the source tree, so Python imports the installed package, not the sources.
cd /tmp
t0=$SECONDS
declare -A status
failed_rc=0
stage() {  # stage NAME LIMIT_S CMD...: runs CMD under a time limit, logs to OUT/NAME.log, shows its tail
  local name=$1 limit=$2
  shift 2
  echo "== [$((SECONDS - t0)) s] $name (limit ${limit} s): $*"
  local begin=$SECONDS
  # SIGINT first: pytest then stops cleanly and still writes its summary and junit xml.
  timeout -s INT --kill-after=15 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  status[$name]="exit $rc, $((SECONDS - begin)) s"
  [ "$rc" -ne 0 ] && failed_rc=$rc
  tail -n "${TAIL_LINES:-15}" "$out/$name.log"
  echo "== $name: ${status[$name]}"
  return $rc
}

device=${R2LM_DEVICE:-cuda}
if [ "$device" = cuda ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >"$out/gpu.txt" 2>&1
  cc=$("$py" -c "import torch; major, minor = torch.cuda.get_device_capability(); print(f'{major}{minor}')") || {
    echo "no CUDA device visible to $py"; exit 1; }
  # Hopper and newer: the arch-specific target ("90a") enables wgmma/TMA; older GPUs take the plain number.
  archs=$cc
  [ "$cc" -ge 90 ] && archs="${cc}a"
  export R2LM_CUDA=ON R2LM_CUDA_ARCHS=${R2LM_CUDA_ARCHS:-$archs}
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
  export PATH="$CUDA_HOME/bin:$PATH"
  echo "== GPU $(tail -n1 "$out/gpu.txt"); compute capability $cc -> R2LM_CUDA_ARCHS=$R2LM_CUDA_ARCHS"
fi

if [ -n "${R2LM_LIBRARY:-}" ]; then
  export R2LM_LIBRARY PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
  echo "== using the extension $R2LM_LIBRARY with the source tree (no build)" | tee "$out/build.log"
else
  # Built from source, offline, into the interpreter's own environment (the machine is discarded after the
  # run). A venv with --system-site-packages would not do: the image's python3 is itself a venv, and a
  # nested venv sees the base interpreter's packages, not its torch.
  pip_flags=(--no-index --no-build-isolation --no-deps)
  "$py" -c "import sys; sys.exit(sys.prefix != sys.base_prefix)" && pip_flags+=(--break-system-packages)
  stage build "${R2LM_BUILD_S:-240}" "$py" -m pip install -v "${pip_flags[@]}" "$repo"
fi
"$py" -c "import r2lm_kernels as r; print('backends:', r.compiled_backends())" | tee -a "$out/build.log"

# pytest-xdist (when there) spreads the tests over a few processes sharing the GPU.
parallel=()
if "$py" -c "import xdist" 2>/dev/null; then
  parallel=(-n "${R2LM_TEST_WORKERS:-4}")
  export OMP_NUM_THREADS=$(( $(nproc) / ${R2LM_TEST_WORKERS:-4} ))
fi
rm -f "$out/tests-junit.xml"
stage tests "${R2LM_TEST_S:-170}" "$py" -m pytest "$repo/python_tests" -q -rfE -p no:cacheprovider \
  -k "${R2LM_TEST_K-not cpu}" "${parallel[@]}" --junitxml "$out/tests-junit.xml"
unset OMP_NUM_THREADS

# The benchmarks get what is left: the microbenchmarks up to R2LM_MICRO_S (less when time is short; a cut
# run keeps the rows it finished; compiling peers may take 40% of it), the end-to-end script the rest but
# 45 s (startup, model build, report), which it plans its measurements to fit. At the stage's limit
# run_all.py still writes its report.
left=$(( ${R2LM_TOTAL_S:-530} - (SECONDS - t0) ))
[ "$left" -lt 120 ] && left=120
micro_s=${R2LM_MICRO_S:-200}
[ "$micro_s" -gt $(( left / 2 )) ] && micro_s=$(( left / 2 ))
e2e_s=$(( left - micro_s - 45 ))
TAIL_LINES=40 stage bench "$left" "$py" "$repo/benchmarks/run_all.py" --out "$out/bench" --device "$device" \
  --micro-timeout-s "$micro_s" --compile-budget-s $(( micro_s * 2 / 5 )) --e2e-budget-s "$e2e_s"

{
echo
echo "================================ summary ($((SECONDS - t0)) s) ================================"
grep -h -E '^backends:' "$out/build.log" || echo "build failed: see $out/build.log"
"$py" - "$out" "$repo" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out = Path(sys.argv[1])
junit = out / "tests-junit.xml"
if junit.exists():
    suites = ET.parse(junit).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    count = lambda key: sum(int(s.get(key, 0)) for s in suites)  # noqa: E731
    print(f"tests: {count('tests')} run, {count('failures')} failed, {count('errors')} errors, "
          f"{count('skipped')} skipped")
    for suite in suites:
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                print("  FAILED", case.get("classname"), case.get("name"))
else:
    print("tests: no junit xml (see tests.log)")
sys.path.insert(0, str(Path(sys.argv[2]) / "benchmarks"))
import harness
micro = out / "bench" / "results.json"
if micro.exists():
    print(harness.compact_table(**json.loads(micro.read_text())))
else:
    print("(no microbenchmark results)")
e2e = out / "bench" / "e2e.md"
print(e2e.read_text() if e2e.exists() else "(no end-to-end results)")
EOF
for name in "${!status[@]}"; do echo "stage $name: ${status[$name]}"; done
echo "all outputs: $out"
} | tee "$out/summary.txt"
# A stage cut at its limit exits 124 (137 if killed); the device tool reads those codes as the whole call
# having run out of time, so a run that finished with a cut stage says 3 instead.
case $failed_rc in 124 | 137) failed_rc=3 ;; esac
exit "$failed_rc"
