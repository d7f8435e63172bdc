"""The benchmark harness (benchmarks/harness.py) and the end-to-end script's pass counts: the figures the
benchmark reports are derived correctly, skipped peers are reported, and the extrapolation counts the same
model passes the generators run."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # e2e_throughput imports harness as a top-level module
    spec = importlib.util.spec_from_file_location(f"r2lm_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


harness = _load("harness")
QUICK = harness.Budget.for_run(quick=True)


def test_timing_measures_the_call():
    timing = harness.time_fn(lambda: time.sleep(0.002), "cpu", QUICK)
    assert timing.reps >= QUICK.min_reps
    assert 0.002 <= timing.median_s < 0.2
    assert timing.p10_s <= timing.median_s <= timing.p90_s


def test_failing_and_skipped_impls_are_reported_not_raised():
    def broken():
        raise RuntimeError("no kernel for this dtype\nsecond line")

    results = [harness.run_impl("ok", lambda: torch.randn(64).sum(), "cpu", QUICK, True),
               harness.run_impl("broken", broken, "cpu", QUICK, True),
               harness.run_impl("absent", harness.Skip("needs CUDA"), "cpu", QUICK, True)]
    assert results[0].timing is not None and results[0].skipped is None
    assert results[1].timing is None and results[1].skipped == "RuntimeError: no kernel for this dtype"
    assert results[1].failed and results[1].as_dict()["status"] == "failed"
    assert results[2].skipped == "needs CUDA" and not results[2].failed


def test_setup_runs_before_every_call_untimed():
    calls = dict(setup=0, fn=0)

    def setup():
        calls["setup"] += 1
        time.sleep(0.003)

    def fn():
        assert calls["setup"] == calls["fn"] + 1, "setup must run right before each call"
        calls["fn"] += 1

    assert harness.first_call(fn, "cpu", setup) < 0.003
    timing = harness.time_fn(fn, "cpu", QUICK, setup=setup)
    assert timing.median_s < 0.003 and calls["setup"] == calls["fn"]


def test_impls_are_timed_in_alternating_rounds():
    log, setups = [], []

    def fast():
        log.append("fast")

    def slow():
        time.sleep(0.004)
        log.append("slow")

    timings = harness.time_in_rounds({"fast": fast, "slow": slow}, QUICK, setup=lambda: setups.append(1),
                                     lead="fast")
    # warm-up (fast, then slow), then per round a chunk of slow calls and a chunk of the lead's
    runs = [name for i, name in enumerate(log) if i == 0 or log[i - 1] != name]
    assert runs == ["fast"] + ["slow", "fast"] * QUICK.min_reps
    assert len(setups) == len(log)
    assert timings["slow"].median_s >= 0.004 > timings["fast"].median_s
    assert timings["slow"].reps >= QUICK.min_reps and timings["fast"].reps > timings["slow"].reps

    def run_lead(fn, before_call, calls):  # an outside timer (pytest-benchmark) drives the lead's calls
        return [before_call() or fn() or 0.5 for _ in range(calls)]

    log.clear()
    timings = harness.time_in_rounds({"fast": fast, "slow": slow}, QUICK, lead="fast", run_lead=run_lead)
    assert timings["fast"].median_s == 0.5 and timings["slow"].median_s >= 0.004
    assert [name for i, name in enumerate(log) if i == 0 or log[i - 1] != name][-2:] == ["slow", "fast"]


def test_preparation_runs_in_the_first_call_only():
    builds = []

    def build():
        builds.append(1)
        time.sleep(0.01)
        return lambda: torch.randn(8).sum()

    result = harness.run_impl("compiled", harness.built_on_first_call(build), "cpu", QUICK, True)
    assert len(builds) == 1 and result.first_call_s >= 0.01 and result.timing.median_s < 0.01

    def failing_build():
        raise ImportError("no flex_attention")

    result = harness.run_impl("flex", harness.built_on_first_call(failing_build), "cpu", QUICK, True)
    assert result.skipped == "ImportError: no flex_attention"


def test_e2e_targets_compare_like_with_like():
    """A full run (with its CUDA-graph capture) is never divided by a step-model extrapolation."""
    e2e = _load("e2e_throughput")
    env = dict(device="cuda", dtype="bfloat16", batches=[16])
    results = [dict(batch=16, method="r2lm", source="full", tokens_per_s=900.0, step_model_tokens_per_s=1000.0),
               dict(batch=16, method="ar", source="extrapolated", tokens_per_s=200.0, step_model_tokens_per_s=200.0)]
    assert e2e.target_checks(env, results, {}) == ["R2LM / AR tokens/s at batch 16 (step model): 5.00x (meets >= 3x)"]
    results[1].update(source="full", tokens_per_s=400.0)
    assert e2e.target_checks(env, results, {}) == ["R2LM / AR tokens/s at batch 16 (full runs): 2.25x (MISSES >= 3x)"]


def test_row_figures_and_reports(tmp_path):
    primary = harness.ImplResult("r2lm", timing=harness.Timing(0.002, 0.0019, 0.0023, 10))
    peer = harness.ImplResult("reference", timing=harness.Timing(0.006, 0.0058, 0.0065, 10))
    skipped = harness.ImplResult("compiled", skipped="too slow")
    copy_bw = dict(gbps=400.0)
    row = harness.make_row("op", dict(n=17), "fp32", "cpu", bytes_moved=400_000_000, flops=None, primary="r2lm",
                           results=[primary, peer, skipped], copy_bw=copy_bw)
    assert math.isclose(row["gbps"], 200.0)
    assert math.isclose(row["pct_copy"], 50.0)
    assert math.isclose(row["speedup"]["reference"], 3.0)
    assert row["speedup"]["compiled"] is None
    assert math.isclose(row["spread"], (0.0023 - 0.0019) / 0.002)

    env = harness.environment("cpu", dict(gbps=400.0, bytes=1, median_s=1.0, spread=0.0))
    harness.write_results(tmp_path, env, [row])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"][0]["gbps"] == row["gbps"] and saved["environment"]["commit"]
    table = (tmp_path / "results.md").read_text()
    for text in ("| op | n=17 | fp32 | cpu | r2lm | 2.000 ms", "200.0", "50.0%", "reference 3.00x",
                 "compiled: skipped (too slow)", env["date"], "torch " + torch.__version__):
        assert text in table, text
    assert "reference 3.00x" in harness.compact_table(env, [row])


def test_history_adds_a_report_once_and_groups_series(tmp_path):
    history_module = _load("plot_history")
    history = tmp_path / "history.jsonl"
    env = harness.environment("cpu", dict(gbps=400.0))
    for run, median_s in (("20260101-0000-cpu", 0.004), ("20260102-0000-cpu", 0.002)):
        rows = [harness.make_row(op, dict(n=17), "fp32", "cpu", 400_000_000, None, "r2lm",
                                 [harness.ImplResult("r2lm", timing=harness.Timing(median_s, median_s, median_s, 5)),
                                  harness.ImplResult("peer", timing=harness.Timing(0.006, 0.006, 0.006, 5))],
                                 dict(gbps=400.0)) for op in ("op_a", "op_b")]
        harness.write_results(tmp_path / run, dict(env, date=run), rows)
        assert history_module.add_report(tmp_path / run, history) == 2
        assert history_module.add_report(tmp_path / run, history) == 0, "a run is added once"
    grouped = history_module.series(history_module.load(history), op="op_a")
    (key, points), = grouped.items()
    assert key[:4] == ("micro", "op_a", "n=17", "fp32")
    assert [p["median_ms"] for p in points] == [4.0, 2.0] and math.isclose(points[1]["speedup"]["peer"], 3.0)
    assert "2.000 ms, 50.0% copy; peer 3.00x" in history_module.table(grouped)

    # A gpu_run.sh bundle keeps its reports in bench/: found there, and a run is known by its date, commit
    # and device rather than by its folder's name.
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (tmp_path / "20260102-0000-cpu").rename(bundle / "bench")
    assert history_module.report_folder(bundle) == bundle / "bench"
    assert history_module.report_folder(tmp_path / "nothing") is None
    assert history_module.add_report(bundle / "bench", history) == 0, "the same run under another name"
    harness.write_results(tmp_path / "other" / "bench", dict(env, date="20260103-0000-cpu"), rows)
    assert history_module.add_report(history_module.report_folder(tmp_path / "other"), history) == 2


def test_primary_failure_is_reported():
    failed = harness.ImplResult("r2lm", skipped="RuntimeError: boom", failed=True)
    peer = harness.ImplResult("reference", timing=harness.Timing(0.006, 0.0058, 0.0065, 10))
    row = harness.make_row("op", dict(n=1), "fp32", "cpu", 10, None, "r2lm", [failed, peer], dict(gbps=1.0))
    assert "gbps" not in row
    env = harness.environment("cpu", dict(gbps=1.0))
    assert "primary failed: RuntimeError: boom" in harness.markdown(env, [row])
    assert env["device_name"].endswith(f", {os.cpu_count()} logical CPUs") and len(env["device_name"]) > 20


def test_a_failing_primary_fails_the_benchmark(tmp_path):
    """A peer that raises is reported and the run goes on; the kernel under test raising fails the test
    (else a broken kernel would leave the benchmark run green)."""
    pytest.importorskip("pytest_benchmark")  # the benchmarks' timer (pip install .[test])
    (tmp_path / "bench_failing.py").write_text(
        "def _broken():\n"
        "    raise RuntimeError('kernel crashed')\n\n"
        "def test_peer_fails(bench):\n"
        "    bench(op='demo', shape=dict(n=1), dtype='fp32', impls=dict(r2lm=lambda: None, peer=_broken),\n"
        "          primary='r2lm')\n\n"
        "def test_primary_fails(bench):\n"
        "    bench(op='demo', shape=dict(n=1), dtype='fp32', impls=dict(r2lm=_broken, peer=lambda: None),\n"
        "          primary='r2lm')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q",
                           "--rootdir", str(tmp_path), "--quick", "--bench-device", "cpu",
                           "--results-dir", str(tmp_path / "out"), str(tmp_path / "bench_failing.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 failed, 1 passed" in done.stdout, done.stdout
    assert "the primary 'r2lm' failed: RuntimeError: kernel crashed" in done.stdout
    assert "peer: failed (RuntimeError: kernel crashed)" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.parametrize("new_tokens,tokens_per_step", [(64, 4), (64, 8)])
def test_extrapolation_counts_the_passes_generation_runs(new_tokens, tokens_per_step):
    """decode_passes (the step model's pass counts) against the generators' own counts on a tiny model."""
    e2e = _load("e2e_throughput")
    from r2lm_kernels.config import R2LMConfig
    from r2lm_kernels.generate import autoregressive_generate, bidirectional_generate, generate
    from r2lm_kernels.model import R2LMForCausalLM

    config = R2LMConfig.tiny(block_size=32)
    model = R2LMForCausalLM(config, impl="reference")
    prompts = torch.randint(0, config.mask_token_id, (2, 64))
    rule = dict(threshold=float("inf"), min_per_step=tokens_per_step, max_per_step=tokens_per_step)
    runs = {
        "r2lm": generate(model, prompts, max_new_tokens=new_tokens, **rule).stats.forward_passes,
        # autoregressive_generate counts the prefill's pass too.
        "ar": autoregressive_generate(model, prompts, max_new_tokens=new_tokens).stats.forward_passes - 1,
        "bidirectional": bidirectional_generate(model, prompts, max_new_tokens=new_tokens, **rule).stats.forward_passes,
    }
    for method, passes in runs.items():
        assert e2e.decode_passes(method, new_tokens, 32, tokens_per_step) == passes, method


@pytest.mark.parametrize("fits,runs,median", [(True, 3, 2.0), (False, 1, 4.0)])
def test_e2e_full_run_reports_the_median_of_the_calls_that_fit(monkeypatch, fits, runs, median):
    """The full run times up to FULL_RUNS generate calls after its warm-up, fewer when the budget says no,
    and reports their median and spread; a call that generates too few tokens fails the run."""
    e2e = _load("e2e_throughput")
    clock, calls = [0.0], []

    class Stats:
        total_generated, forward_passes = 2 * 64, 20

    def fake_generate(method, model, prompts, new_tokens, setup, cuda_graph):
        calls.append(new_tokens)
        clock[0] += durations[len(calls) - 1]
        return type("Output", (), {"stats": Stats})()
    monkeypatch.setattr(e2e, "generate_call", fake_generate)
    monkeypatch.setattr(e2e, "random_prompts", lambda model, batch, length: None)
    monkeypatch.setattr(e2e, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    model = type("Model", (), {"config": type("Config", (), {"block_size": 32})})()
    setup = e2e.setup_for("cpu", quick=False)
    durations = [9.0, 4.0, 1.0, 2.0]  # the warm-up's, then the timed calls'
    run = e2e.full_run("r2lm", model, 2, setup, "cpu", lambda seconds: fits)
    assert e2e.FULL_RUNS == 3 and calls == [32] + [setup.new_tokens] * runs
    assert run["runs"] == runs and run["seconds"] == median and run["tokens_per_s"] == 128 / median
    assert run["spread"] == pytest.approx((4.0 - 1.0) / median if runs == 3 else 0.0)
    Stats.total_generated, calls[:] = 100, []
    with pytest.raises(RuntimeError, match="generated 100 tokens, expected 128"):
        e2e.full_run("r2lm", model, 2, setup, "cpu", lambda seconds: fits)


@pytest.mark.parametrize("error,code", [(RuntimeError("kernel crashed"), 1),
                                        (torch.OutOfMemoryError("CUDA out of memory"), 0)])
def test_e2e_exit_code_says_whether_a_measurement_failed(tmp_path, monkeypatch, error, code):
    """A failed step timing or full run is reported in the table and makes the exit code non-zero, unless
    the device ran out of memory (expected at the largest batches)."""
    e2e = _load("e2e_throughput")

    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(e2e, "StepTimer", fail)
    monkeypatch.setattr(e2e, "full_run", fail)
    monkeypatch.setattr(sys, "argv", ["e2e_throughput.py", "--device", "cpu", "--quick", "--batches", "1",
                                      "--out", str(tmp_path)])
    assert e2e.main() == code
    assert "full run failed" in (tmp_path / "e2e.md").read_text()
