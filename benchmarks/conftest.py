"""Fixtures for the benchmark modules (benchmarks/bench_<op>.py); the timing lives in harness.py.

Fixtures:
  device  "cuda" when available, else "cpu" (override: --bench-device / R2LM_BENCH_DEVICE)
  quick   True under --quick or R2LM_BENCH_QUICK=1: shrink shapes so the run fits CI
  bench   bench(op=, shape=, dtype=, bytes_moved=, impls={name: fn}, primary=, flops=None, notes="",
                flush_l2=True, setup=None) -> the results row (dict). Times every impl in this run (setup()
                before each call, untimed), reports GB/s, % of the copy bandwidth and each peer's ratio, and
                adds the row to results.json/.md.
  copy_bandwidth  the device copy bandwidth (measured once per session)

Results go to --results-dir, else R2LM_BENCH_DIR, else benchmarks/results/latest-<device>.

Compilation is the slow part of a run: an impl whose name contains "compile" or "flex" counts as compiled,
and the first calls of compiled impls share a session budget (--compile-budget-s /
R2LM_BENCH_COMPILE_BUDGET_S; 0 under --quick, unlimited otherwise). Once it is spent, later compiled impls
are reported as skipped with that reason.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

_ROWS_KEY = pytest.StashKey[list]()
_ENV_KEY = pytest.StashKey[dict]()


def pytest_addoption(parser):
    group = parser.getgroup("r2lm benchmarks")
    group.addoption("--results-dir", default=None,
                    help="folder for results.json / results.md (default: $R2LM_BENCH_DIR or "
                         "benchmarks/results/latest-<device>)")
    group.addoption("--quick", action="store_true", default=False,
                    help="small shapes and short timing (also R2LM_BENCH_QUICK=1)")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")
    group.addoption("--compile-budget-s", type=float, default=None,
                    help="seconds of first calls (compilation) allowed to compiled peers in the whole session "
                         "(also R2LM_BENCH_COMPILE_BUDGET_S; default 0 under --quick, else unlimited)")


def results_dir(config) -> Path:
    chosen = config.getoption("--results-dir") or os.environ.get("R2LM_BENCH_DIR")
    return Path(chosen) if chosen else harness.REPO / "benchmarks" / "results" / f"latest-{harness.bench_device(config)}"


def pytest_configure(config):
    config.stash[_ROWS_KEY] = []


# The modules' run order, for a run cut at its time limit (a GPU run has a few minutes): the ops with targets
# first, the copy rows (the bandwidth reference is measured by the copy_bandwidth fixture anyway) last.
_MODULE_ORDER = ("bench_cache_attention", "bench_reverse_selective_scan", "bench_reverse_conv1d",
                 "bench_parallel_commit", "bench_copy")


def pytest_collection_modifyitems(items):
    def rank(item):
        stem = Path(str(item.fspath)).stem
        return _MODULE_ORDER.index(stem) if stem in _MODULE_ORDER else len(_MODULE_ORDER)
    items.sort(key=rank)  # stable: each module keeps its own order


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    return harness.bench_device(pytestconfig)


@pytest.fixture(scope="session")
def quick(pytestconfig) -> bool:
    return harness.bench_quick(pytestconfig)


@pytest.fixture(scope="session")
def budget(quick) -> harness.Budget:
    return harness.Budget.for_run(quick)


@pytest.fixture(scope="session")
def compile_budget(pytestconfig, quick) -> dict:
    chosen = pytestconfig.getoption("--compile-budget-s")
    if chosen is None:
        chosen = os.environ.get("R2LM_BENCH_COMPILE_BUDGET_S")
    limit = float(chosen) if chosen not in (None, "") else (0.0 if quick else float("inf"))
    return dict(limit_s=limit, spent_s=0.0)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled peers of different tests wrap the same functions, and Dynamo keeps its compiled code per
    function: without a reset, later tests (other shapes, dtypes, seq_idx or requires_grad) would first be
    recompiled with dynamic shapes, then hit the recompile limit and silently time eager code under a
    "compile" name."""
    torch._dynamo.reset()
    yield


def _is_compiled(name: str) -> bool:
    return "compile" in name.lower() or "flex" in name.lower()


@pytest.fixture(scope="session")
def copy_bandwidth(pytestconfig, device, quick) -> dict:
    measured = harness.measure_copy_bandwidth(device, quick)
    pytestconfig.stash[_ENV_KEY] = harness.environment(device, measured)
    return measured


@pytest.fixture
def bench(request, benchmark, device, budget, copy_bandwidth, compile_budget):
    """Call once or more per test; the first call's primary is also timed through pytest-benchmark."""
    pedantic_used = False

    def cuda_primary_timer(fn, flush_l2, setup):
        # CUDA: pytest-benchmark shows the primary (its host clock needs a synchronize per call, so the
        # reported figures come from CUDA events instead).
        nonlocal pedantic_used
        if not pedantic_used and not benchmark.disabled:
            pedantic_used = True

            def synced():
                fn()
                torch.cuda.synchronize()
            benchmark.pedantic(synced, setup=setup, rounds=budget.min_reps, iterations=1, warmup_rounds=1)
        return harness.time_fn(fn, device, budget, flush_l2, setup)

    def run_primary_through_benchmark(fn, before_call, calls):
        # CPU: pytest-benchmark times the primary's calls (its table and JSON then show them); the peers'
        # chunks run in its untimed setup.
        nonlocal pedantic_used
        if pedantic_used or benchmark.disabled:
            return harness.time_calls(fn, before_call, calls)
        pedantic_used = True
        benchmark.pedantic(fn, setup=before_call, rounds=calls, iterations=1, warmup_rounds=0)
        return list(benchmark.stats.stats.data)

    def run(*, op: str, shape: dict, dtype: str, impls: dict, primary: str, bytes_moved: int | None = None,
            flops: int | None = None, notes: str = "", flush_l2: bool = True, setup=None) -> dict:
        if primary not in impls:
            raise ValueError(f"primary={primary!r} is not one of impls {sorted(impls)}")
        on_cpu = device != "cuda"
        results, ready = [], {}
        for name, fn in impls.items():
            compiled = _is_compiled(name) and name != primary
            if compiled and compile_budget["spent_s"] >= compile_budget["limit_s"]:
                fn = harness.Skip("compiled peers are off (--quick or --compile-budget-s 0)"
                                  if compile_budget["limit_s"] == 0 else
                                  f"the session's compile budget ({compile_budget['limit_s']:.0f} s) is spent")
            timer = (lambda f: cuda_primary_timer(f, flush_l2, setup)) if name == primary and not on_cpu else None
            result = harness.run_impl(name, fn, device, budget, flush_l2, timer=timer, setup=setup,
                                      timed=not on_cpu)
            if compiled:
                compile_budget["spent_s"] += result.first_call_s
            if result.skipped is None:
                ready[name] = fn
            results.append(result)
        if on_cpu and ready:
            timings = harness.time_in_rounds(ready, budget, setup, lead=primary,
                                             run_lead=run_primary_through_benchmark if primary in ready else None)
            for result in results:
                result.timing = timings.get(result.name)
        if device == "cuda" and not flush_l2:
            notes = "; ".join(filter(None, [notes, "warm L2 (no flush between calls)"]))
        row = harness.make_row(op, shape, dtype, device, bytes_moved, flops, primary, results, copy_bandwidth,
                               notes)
        request.config.stash[_ROWS_KEY].append(row)
        # Written after every row, so a run cut short by a time limit still leaves its results.
        harness.write_results(results_dir(request.config), request.config.stash[_ENV_KEY],
                              request.config.stash[_ROWS_KEY])
        benchmark.extra_info.update({k: v for k, v in row.items() if k != "notes" or v})
        benchmark.extra_info["copy_gbps"] = copy_bandwidth["gbps"]
        primary_result = next(r for r in results if r.name == primary)
        if primary_result.failed:  # a peer may fail (reported as such); the kernel under test may not
            pytest.fail(f"{op} {dtype}: the primary {primary!r} failed: {primary_result.skipped}", pytrace=False)
        return row

    return run


def pytest_sessionfinish(session, exitstatus):
    rows = session.config.stash[_ROWS_KEY]
    env = session.config.stash.get(_ENV_KEY, None)
    if not rows or env is None:
        return
    # A second copy measurement shows whether the machine's bandwidth moved during the run (a shared machine's
    # load does), which the rows' % copy, all against the first, would hide.
    env["copy_bandwidth_end"] = harness.measure_copy_bandwidth(env["device"], harness.bench_quick(session.config))
    out = results_dir(session.config)
    harness.write_results(out, env, rows)
    session.config.stash[_ENV_KEY]["written_to"] = str(out)


def pytest_terminal_summary(terminalreporter, config):
    rows = config.stash[_ROWS_KEY]
    env = config.stash.get(_ENV_KEY, None)
    if rows and env is not None:
        terminalreporter.write_sep("=", "r2lm benchmark results")
        terminalreporter.write(harness.markdown(env, rows))
        terminalreporter.write_line(f"written to {env.get('written_to', results_dir(config))}/results.{{json,md}}")
