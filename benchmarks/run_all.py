"""The one benchmark command: every microbenchmark on the current device, then end-to-end throughput,
into one report folder (results.json/.md of the microbenchmarks, e2e.json/.md, report.md, PNG plots
when matplotlib is installed). A full run into benchmarks/results/ also adds its results to
benchmarks/results/history.jsonl (see plot_history.py).

    python benchmarks/run_all.py                 # full run; report in benchmarks/results/<date>-<device>/
    python benchmarks/run_all.py --quick         # CI: small shapes, short timing (under a minute on 2 cores)
    python benchmarks/run_all.py --out DIR --device cuda --e2e-budget-s 240

Uses the installed r2lm_kernels, or the source tree with R2LM_LIBRARY=<build>/_C*.so (dev builds).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import plot_history  # noqa: E402


def _child_env() -> dict:
    """Environment for the child processes (they run from another folder): with a dev build loaded through
    R2LM_LIBRARY, the source tree goes first on the path, so the benchmarks time the sources' wrappers and
    references with that extension, not an installed copy's."""
    env = dict(os.environ)
    if env.get("R2LM_LIBRARY"):
        env["R2LM_LIBRARY"] = str(Path(env["R2LM_LIBRARY"]).resolve())
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _device_slug(device: str) -> str:
    import torch
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = "cpu"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _run(cmd: list[str], env: dict, timeout_s: float | None, log: Path) -> int:
    """Runs a child with its output both shown and saved. At the time limit it gets SIGINT (pytest then
    stops cleanly, keeping what it measured), SIGKILL 15 s later; the exit code says so (124)."""
    print("==", " ".join(cmd), flush=True)
    started = time.perf_counter()
    child = subprocess.Popen(cmd, cwd="/", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timed_out = threading.Event()

    def stop():
        timed_out.set()
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()

    watchdog = threading.Timer(timeout_s, stop) if timeout_s else None  # None or 0: no limit
    if watchdog:
        watchdog.start()
    with open(log, "w") as sink:
        for line in child.stdout:
            sys.stdout.write(line)
            sink.write(line)
    code = child.wait()
    if watchdog:
        watchdog.cancel()
    if timed_out.is_set():
        code = 124
    print(f"== exit {code}{' (time limit)' if code == 124 else ''} after {time.perf_counter() - started:.0f} s "
          f"(log: {log})", flush=True)
    return code


def plot(out: Path) -> list[str]:
    """PNG pictures of the results, when matplotlib is installed; returns the files written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("== matplotlib not installed: no plots")
        return []
    written = []
    micro = out / "results.json"
    if micro.exists():
        rows = [r for r in json.loads(micro.read_text())["rows"] if r.get("pct_copy") is not None]
        if rows:
            labels = [f"{r['op']} {r['dtype']}\n" + ",".join(f"{v}" for v in r["shape"].values()) for r in rows]
            fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(rows)), 4.5))
            ax.bar(range(len(rows)), [r["pct_copy"] for r in rows], color="tab:blue")
            ax.axhline(100, color="gray", linestyle="--", linewidth=1)
            ax.set_xticks(range(len(rows)), labels, rotation=70, ha="right", fontsize=6)
            ax.set_ylabel("% of device copy bandwidth")
            ax.set_title("r2lm_kernels: achieved bandwidth (primary impl)")
            fig.tight_layout()
            fig.savefig(out / "micro_bandwidth.png", dpi=120)
            plt.close(fig)
            written.append("micro_bandwidth.png")
    e2e = out / "e2e.json"
    if e2e.exists():
        runs = json.loads(e2e.read_text()).get("results", [])
        methods = sorted({r["method"] for r in runs})
        if runs:
            fig, ax = plt.subplots(figsize=(6, 4))
            for method in methods:
                points = sorted((r["batch"], r["tokens_per_s"], r.get("source")) for r in runs
                                if r["method"] == method and r.get("tokens_per_s"))
                if points:
                    line, = ax.plot([p[0] for p in points], [p[1] for p in points], label=method)
                    for batch, tps, source in points:  # open markers: extrapolated from step times
                        ax.plot(batch, tps, marker="o", color=line.get_color(),
                                markerfacecolor="none" if source == "extrapolated" else line.get_color())
            batches = sorted({r["batch"] for r in runs})
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.set_yscale("log")
            ax.set_xlabel("batch (open markers: extrapolated from step times)")
            ax.set_ylabel("generated tokens / s")
            ax.set_title("end-to-end generation throughput")
            ax.legend()
            ax.grid(True, which="both", alpha=0.3)
            fig.tight_layout()
            fig.savefig(out / "e2e_throughput.png", dpi=120)
            plt.close(fig)
            written.append("e2e_throughput.png")
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="report folder")
    parser.add_argument("--quick", action="store_true", help="small shapes and short timing (CI)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--skip-micro", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--micro-timeout-s", type=float, default=None)
    parser.add_argument("--compile-budget-s", type=float, default=None,
                        help="seconds the microbenchmarks may spend compiling peers (torch.compile, FlexAttention)")
    parser.add_argument("--e2e-budget-s", type=float, default=None,
                        help="time the end-to-end script may use (it plans its measurements to fit)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --), e.g. -k scan")
    args = parser.parse_args()

    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")
    out = (args.out or REPO / "benchmarks" / "results" /
           f"{stamp}-{_device_slug(device)}{'-quick' if args.quick else ''}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = _child_env()
    env["R2LM_BENCH_DEVICE"] = device
    # An interrupt (Ctrl-C, or a time limit such as scripts/gpu_run.sh's, both signalling the whole process
    # group) stops the running child, which keeps what it measured; the later stages are skipped and the
    # report is still written.
    interrupted = threading.Event()
    signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
    if args.quick and device == "cpu" and "OMP_NUM_THREADS" not in env:
        # A quick run checks the plumbing; on a busy shared CPU, spinning OpenMP threads slow it tenfold.
        env["OMP_NUM_THREADS"] = "1"
        print("== --quick on CPU: OMP_NUM_THREADS=1 (set it to override)")
    codes = {}

    if not args.skip_micro:
        cmd = [sys.executable, "-m", "pytest", str(HERE), "-c", str(HERE / "pytest.ini"), "--rootdir", str(HERE),
               "-q", "--results-dir", str(out), "--bench-device", device,
               "--benchmark-json", str(out / "pytest-benchmark.json"),
               "--benchmark-columns", "median,iqr,rounds", "--junitxml", str(out / "bench-junit.xml")]
        if args.quick:
            cmd.append("--quick")
        if args.compile_budget_s is not None:
            cmd += ["--compile-budget-s", str(args.compile_budget_s)]
        codes["micro"] = _run(cmd + args.pytest_args, env, args.micro_timeout_s, out / "micro.log")
        if interrupted.is_set():
            codes["micro"] = 130

    if not args.skip_e2e and interrupted.is_set():
        codes["e2e"] = 130
    elif not args.skip_e2e:
        cmd = [sys.executable, str(HERE / "e2e_throughput.py"), "--out", str(out), "--device", device]
        if args.quick:
            cmd.append("--quick")
        if args.e2e_budget_s:
            cmd += ["--budget-s", str(args.e2e_budget_s)]
        # The e2e script plans to its budget; the hard timeout only guards against a hang.
        hard_timeout = None if args.e2e_budget_s is None else 1.5 * args.e2e_budget_s + 60
        codes["e2e"] = _run(cmd, env, hard_timeout, out / "e2e.log")
        if interrupted.is_set():
            codes["e2e"] = 130

    pictures = plot(out)
    parts = [(out / name).read_text() for name in ("results.md", "e2e.md") if (out / name).exists()]
    parts += [f"![{name}]({name})\n" for name in pictures]
    status = ", ".join(f"{stage}: {'ok' if code == 0 else 'interrupted' if code == 130 else f'exit {code}'}"
                       for stage, code in codes.items())
    (out / "report.md").write_text("\n".join(parts + [f"Stages: {status}\n"]))
    print(f"== report: {out}/report.md ({status})")
    if not args.quick and out.parent == plot_history.HISTORY.parent:  # a kept report: into the history too
        added = plot_history.add_report(out)
        print(f"== history: {added} lines added to {plot_history.HISTORY.relative_to(REPO)}")
    return max(codes.values(), default=0)


if __name__ == "__main__":
    sys.exit(main())
