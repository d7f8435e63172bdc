"""Benchmark harness: times every implementation of one op in the same run and reports achieved
bandwidth against the device copy bandwidth measured in that run (DESIGN.md section 5).

Bench modules do not import this file; they use the `bench` fixture from conftest.py:

    def test_scan_forward(bench, device, quick):
        ...random inputs...
        bench(op="reverse_selective_scan.fwd", shape=dict(batch=2, seqlen=1024, dim=512, d_state=16),
              dtype="fp32", bytes_moved=n_bytes,
              impls={"r2lm": lambda: ..., "reference": lambda: ..., "torch.compile(reference)": ...},
              primary="r2lm")

An impl may be `Skip("why")` instead of a callable, or raise `Skip` / any exception on its first call:
it is then reported as skipped with the reason. A peer whose first call takes longer than
`slow_limit_s` is skipped as too slow. An impl that must be prepared (compiled, a mask or an autograd graph
built) is wrapped in `built_on_first_call`, so that the preparation is counted as its first call. `setup`
(optional) runs before every call, outside the timed region: it restores what an in-place op changed.

GPU timing: CUDA events around each call, after a warm-up, median of many calls. Before each timed
call a buffer twice the L2 size is read, so every call starts from a cold L2 (as the bytes of a
bandwidth-bound op "must move" from memory); pass `flush_l2=False` to time warm-cache behaviour.
CPU timing: time.perf_counter around each call, median; an op's impls are timed in rounds, a chunk of
calls of each in turn (`time_in_rounds`), so that a slow spell of a shared machine falls on all of them
and the ratios between them hold.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent


class Skip(Exception):
    """Raised by (or given instead of) an impl that cannot run here; the reason is reported."""


def built_on_first_call(build: Callable[[], Callable]) -> Callable:
    """An impl whose preparation, build() returning the callable to time, runs inside its first call: the
    harness counts that call as compilation (the compiled peers' budget), and a peer skipped before its
    first call never prepares. An exception from build() reports the impl as skipped."""
    prepared = []

    def call():
        if not prepared:
            prepared.append(build())
        return prepared[0]()
    return call


def _no_setup():
    pass


# --- the run's device and size, and cases that depend on them ---------------------------------------------

def bench_device(config) -> str:
    """--bench-device, else $R2LM_BENCH_DEVICE, else "cuda" when available, else "cpu"."""
    chosen = config.getoption("--bench-device") or os.environ.get("R2LM_BENCH_DEVICE")
    return chosen or ("cuda" if torch.cuda.is_available() else "cpu")


def bench_quick(config) -> bool:
    """--quick or R2LM_BENCH_QUICK (other than "" and "0")."""
    return bool(config.getoption("--quick")) or os.environ.get("R2LM_BENCH_QUICK", "") not in ("", "0")


def case_id(case) -> str:
    """Test id of a ((batch, seqlen, dim, segmented), dtype) case, e.g. "2x1024x512-seg-float32"."""
    (batch, seqlen, dim, segmented), dtype = case
    return f"{batch}x{seqlen}x{dim}-{'seg' if segmented else 'noseg'}-{str(dtype).removeprefix('torch.')}"


def parametrize_cases(metafunc, cases: Callable, ids: Callable = case_id) -> None:
    """For a bench module's pytest_generate_tests: parametrizes a test's `case` argument with
    cases(device, quick), where the cases depend on the run's device and --quick."""
    if "case" in metafunc.fixturenames:
        chosen = cases(bench_device(metafunc.config), bench_quick(metafunc.config))
        metafunc.parametrize("case", chosen, ids=[ids(c) for c in chosen])


@dataclass
class Budget:
    """How long to spend on one impl. quick=True shrinks everything for CI."""
    warmup_s: float = 0.05
    measure_s: float = 0.3
    min_reps: int = 5
    max_reps: int = 1000
    slow_limit_s: float = 10.0

    @classmethod
    def for_run(cls, quick: bool) -> "Budget":
        return cls(warmup_s=0.02, measure_s=0.08, min_reps=3, max_reps=200, slow_limit_s=3.0) if quick else cls()


@dataclass
class Timing:
    median_s: float
    p10_s: float
    p90_s: float
    reps: int

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the relative width of the middle 80% of the samples."""
        return (self.p90_s - self.p10_s) / self.median_s if self.median_s > 0 else float("nan")

    @classmethod
    def of(cls, samples_s: list[float]) -> "Timing":
        ordered = sorted(samples_s)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]  # noqa: E731
        return cls(statistics.median(ordered), pick(0.1), pick(0.9), len(ordered))


class _L2Flusher:
    """Reads a buffer twice the L2 size, so the next kernel reads from device memory. A read, not a fill:
    a fill would leave the L2 full of dirty lines, which the timed kernel would then pay to write back."""

    def __init__(self, device: torch.device):
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20) or (64 << 20)
        self.buffer = torch.ones(2 * l2 // 4, dtype=torch.int32, device=device)
        self.total = torch.empty((), dtype=torch.int64, device=device)

    def __call__(self):
        torch.sum(self.buffer, dim=0, dtype=torch.int64, out=self.total)


_flushers: dict = {}


def _time_cuda(fn: Callable, budget: Budget, flush_l2: bool, setup: Callable) -> Timing:
    device = torch.device("cuda", torch.cuda.current_device())
    if flush_l2 and device not in _flushers:
        _flushers[device] = _L2Flusher(device)
    flush = _flushers[device] if flush_l2 else (lambda: None)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    # Estimate one call's time from a short batch, then size warm-up and measurement from it.
    torch.cuda.synchronize()
    start.record()
    for _ in range(3):
        setup()
        fn()
    end.record()
    torch.cuda.synchronize()
    per_call_s = max(start.elapsed_time(end) / 3e3, 1e-7)
    for _ in range(max(1, min(budget.max_reps, int(budget.warmup_s / per_call_s)))):
        setup()
        fn()
    reps = max(budget.min_reps, min(budget.max_reps, int(budget.measure_s / per_call_s)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for begin, finish in events:
        flush()
        setup()
        begin.record()
        fn()
        finish.record()
    torch.cuda.synchronize()
    return Timing.of([b.elapsed_time(f) / 1e3 for b, f in events])


def time_calls(fn: Callable, before_call: Callable, calls: int) -> list[float]:
    """Seconds of each of `calls` calls of fn, before_call() running untimed before each."""
    samples = []
    for _ in range(calls):
        before_call()
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def time_in_rounds(fns: dict[str, Callable], budget: Budget, setup: Callable | None = None, lead: str | None = None,
                   run_lead: Callable | None = None) -> dict[str, Timing]:
    """CPU: the median time of each fn, timed in budget.min_reps rounds; a round runs a chunk of calls of
    every fn in turn (lead last), each chunk about budget.measure_s / rounds long (at least one call), with
    setup() before every call, untimed. Within a chunk the calls run back to back (warm caches, as when an
    impl is timed alone), and a slow spell of the machine falls on every fn rather than on one.
    `run_lead(fn, before_call, calls) -> seconds per call` times the lead's calls (default: perf_counter);
    the other fns' chunks run inside its before_call, untimed by it."""
    setup = setup or _no_setup
    per_call = {}
    for name, fn in fns.items():  # warm-up; the last warm call sizes the chunks
        per_call[name] = max(time_calls(fn, setup, 1)[0], 1e-7)
        for _ in range(min(int(budget.warmup_s / per_call[name]), budget.max_reps)):
            per_call[name] = max(time_calls(fn, setup, 1)[0], 1e-7)
    rounds = budget.min_reps
    chunk = {name: max(1, min(budget.max_reps // rounds, int(budget.measure_s / rounds / t)))
             for name, t in per_call.items()}
    lead = lead if lead in fns else next(iter(fns))
    samples = {name: [] for name in fns}
    lead_calls = 0

    def before_lead_call():
        nonlocal lead_calls
        if lead_calls % chunk[lead] == 0:
            for name, fn in fns.items():
                if name != lead:
                    samples[name] += time_calls(fn, setup, chunk[name])
        lead_calls += 1
        setup()

    samples[lead] = (run_lead or time_calls)(fns[lead], before_lead_call, rounds * chunk[lead])
    return {name: Timing.of(s) for name, s in samples.items()}


def time_fn(fn: Callable, device: str, budget: Budget, flush_l2: bool = True, setup: Callable | None = None
            ) -> Timing:
    """Median time of fn() on `device` ("cuda" or "cpu"); setup() runs before each call, untimed."""
    if torch.device(device).type == "cuda":
        return _time_cuda(fn, budget, flush_l2, setup or _no_setup)
    return time_in_rounds({"fn": fn}, budget, setup)["fn"]


def _synchronize(device: str):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def first_call(fn: Callable, device: str, setup: Callable | None = None) -> float:
    """Runs fn once (compiles, autotunes, loads modules) and returns how long it took (setup() untimed)."""
    (setup or _no_setup)()
    _synchronize(device)
    started = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - started


def measure_copy_bandwidth(device: str, quick: bool) -> dict:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written (the roofline)."""
    is_cuda = torch.device(device).type == "cuda"
    n_bytes = (1 << 30 if not quick else 256 << 20) if is_cuda else (256 << 20 if not quick else 64 << 20)
    src = torch.randint(0, 1 << 30, (n_bytes // 4,), dtype=torch.int32, device=device)
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    first_call(copy, device)
    timing = time_fn(copy, device, Budget.for_run(quick), flush_l2=False)
    return dict(bytes=2 * n_bytes, median_s=timing.median_s, spread=timing.spread,
                gbps=2 * n_bytes / timing.median_s / 1e9)


@dataclass
class ImplResult:
    name: str
    timing: Timing | None = None
    skipped: str | None = None
    failed: bool = False  # skipped because it raised an error (not Skip): fatal for a primary
    first_call_s: float = 0.0  # compilation, autotuning and module loading land here

    def as_dict(self) -> dict:
        if self.timing is None:
            return dict(status="failed" if self.failed else "skipped", reason=self.skipped)
        t = self.timing
        return dict(status="ok", median_ms=t.median_s * 1e3, p10_ms=t.p10_s * 1e3, p90_ms=t.p90_s * 1e3,
                    spread=t.spread, reps=t.reps)


def run_impl(name: str, fn, device: str, budget: Budget, flush_l2: bool, timer=None,
             setup: Callable | None = None, timed: bool = True) -> ImplResult:
    """Times one impl, turning Skip, errors and excessive slowness into a skipped result.
    `timer(fn) -> Timing` replaces the default timing (the CUDA primary goes through pytest-benchmark);
    timed=False stops after the first calls (timing None, skipped None: ready for `time_in_rounds`)."""
    if isinstance(fn, Skip):
        return ImplResult(name, skipped=str(fn))
    first_s = 0.0
    try:
        first_s = first_call(fn, device, setup)
        if first_s > budget.slow_limit_s:
            # A second call tells compilation (first call only) from a slow impl.
            again_s = first_call(fn, device, setup)
            if again_s > budget.slow_limit_s:
                return ImplResult(name, skipped=f"too slow ({again_s:.1f} s a call)", first_call_s=first_s)
        if not timed:
            return ImplResult(name, first_call_s=first_s)
        return ImplResult(name, timing=(timer or (lambda f: time_fn(f, device, budget, flush_l2, setup)))(fn),
                          first_call_s=first_s)
    except Skip as why:
        return ImplResult(name, skipped=str(why), first_call_s=first_s)
    except Exception as error:  # a peer that fails (e.g. torch.compile unavailable) must not end the run
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        return ImplResult(name, skipped=f"{type(error).__name__}: {first_line}", failed=True, first_call_s=first_s)


def make_row(op: str, shape: dict, dtype: str, device: str, bytes_moved: int | None, flops: int | None,
             primary: str, results: list[ImplResult], copy_bw: dict, notes: str = "") -> dict:
    """One results row: every impl's timing, the primary's GB/s and % of copy bandwidth, peer ratios."""
    by_name = {r.name: r for r in results}
    main = by_name[primary].timing
    row = dict(op=op, shape=shape, dtype=dtype, device=device, primary=primary, bytes_moved=bytes_moved,
               flops=flops, impls={r.name: r.as_dict() for r in results}, notes=notes)
    if main is not None:
        row["median_ms"] = main.median_s * 1e3
        row["spread"] = main.spread
        if bytes_moved:
            row["gbps"] = bytes_moved / main.median_s / 1e9
            row["pct_copy"] = 100 * row["gbps"] / copy_bw["gbps"]
        if flops:
            row["tflops"] = flops / main.median_s / 1e12
        # "speedup vs <peer>": the peer's time over the primary's time (>1: the primary is faster).
        row["speedup"] = {r.name: (r.timing.median_s / main.median_s if r.timing else None)
                          for r in results if r.name != primary}
    return row


def cpu_name() -> str:
    """The CPU's model name (platform.processor() is often empty on Linux), with its logical CPU count."""
    name = platform.processor() or platform.machine()
    try:
        models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")]
        name = models[0] if models else name
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


def environment(device: str, copy_bw: dict | None) -> dict:
    """Header facts: device, date, commit, versions, copy bandwidth."""
    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    is_cuda = torch.device(device).type == "cuda"
    try:
        from r2lm_kernels import compiled_backends
        backends = compiled_backends()
    except Exception as error:  # the copy benchmark runs without the extension
        backends = f"unavailable ({type(error).__name__})"
    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return dict(
        device=device,
        device_name=torch.cuda.get_device_name() if is_cuda else cpu_name(),
        cpu_threads=torch.get_num_threads(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        commit=commit,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        r2lm_backends=backends,
        copy_bandwidth=copy_bw,
    )


def _fmt_time(ms) -> str:
    if ms is None:
        return "-"
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.3f} ms" if ms < 100 else f"{ms / 1e3:.3f} s"


def _fmt_shape(shape: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in shape.items())


def markdown(env: dict, rows: list[dict]) -> str:
    """The results table with a header naming device, date, commit and versions."""
    bw = env.get("copy_bandwidth") or {}
    lines = [
        f"# r2lm_kernels microbenchmarks — {env['device_name']} ({env['device']})",
        "",
        f"- date: {env['date']}; commit: `{env['commit']}`",
        f"- torch {env['torch']}, CUDA {env['cuda']}, Python {env['python']}, CPU threads {env['cpu_threads']}; "
        f"r2lm backends: {env['r2lm_backends']}",
        f"- device copy bandwidth (read + write, measured in this run): "
        f"{bw.get('gbps', float('nan')):.1f} GB/s"
        + (f" (measured again at the end: {env['copy_bandwidth_end']['gbps']:.1f} GB/s; % copy uses the first)"
           if env.get("copy_bandwidth_end") else ""),
        "- time: median (spread = (p90 - p10) / median); GB/s = bytes that must move once / median time; "
        "GPU calls each start from a cold L2 unless noted; speedup = peer time / primary time",
        "",
        "| op | shape | dtype | device | primary | median | spread | GB/s | % copy | speedup vs peers |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        peers = []
        for name, ratio in (row.get("speedup") or {}).items():
            impl = row["impls"][name]
            peers.append(f"{name} {ratio:.2f}x" if ratio is not None else
                         f"{name}: {impl['status']} ({impl['reason']})")
        if "median_ms" not in row:
            primary = row["impls"][row["primary"]]
            peers.insert(0, f"primary {primary['status']}: {primary['reason']}")
        gbps = f"{row['gbps']:.1f}" if "gbps" in row else "-"
        pct = f"{row['pct_copy']:.1f}%" if "pct_copy" in row else "-"
        spread = f"{100 * row['spread']:.0f}%" if "spread" in row else "-"
        lines.append(f"| {row['op']} | {_fmt_shape(row['shape'])} | {row['dtype']} | {row['device']} | "
                     f"{row['primary']} | {_fmt_time(row.get('median_ms'))} | {spread} | {gbps} | {pct} | "
                     f"{'; '.join(peers) or '-'} |")
    notes = [f"- {row['op']} ({_fmt_shape(row['shape'])}): {row['notes']}" for row in rows if row.get("notes")]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def write_results(results_dir: Path, env: dict, rows: list[dict]) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "results.json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1, default=str))
    (results_dir / "results.md").write_text(markdown(env, rows))



def compact_table(environment: dict, rows: list[dict]) -> str:
    """A narrow plain-text version of the table, for the end of a log."""
    bw = (environment.get("copy_bandwidth") or {}).get("gbps", float("nan"))
    lines = [f"microbenchmarks: {environment['device_name']}, copy {bw:.0f} GB/s, commit {environment['commit']}",
             f"{'op':<22} {'dtype':<8} {'shape':<56} {'median':>10} {'GB/s':>7} {'%copy':>6}  speedup vs peers"]
    for row in rows:
        shape = ",".join(f"{k}={v}" for k, v in row["shape"].items())
        peers = ", ".join(f"{name} {ratio:.2f}x" if ratio is not None else f"{name} {row['impls'][name]['status']}"
                          for name, ratio in (row.get("speedup") or {}).items())
        gbps = f"{row['gbps']:.0f}" if "gbps" in row else "-"
        pct = f"{row['pct_copy']:.0f}%" if "pct_copy" in row else "-"
        peers = peers or f"primary {row['impls'][row['primary']]['status']}"
        lines.append(f"{row['op'][:22]:<22} {row['dtype'][:8]:<8} {shape[:56]:<56} "
                     f"{_fmt_time(row.get('median_ms')):>10} {gbps:>7} {pct:>6}  {peers}")
    return "\n".join(lines)
