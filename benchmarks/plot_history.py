"""The benchmark history: every kept report folder's results, one JSON line per result in
benchmarks/results/history.jsonl, and the series they form over time (per op, shape, dtype and device).

    python benchmarks/plot_history.py                        # every series as a table (+ PNGs with matplotlib)
    python benchmarks/plot_history.py --op cache_attention   # the series whose op (or e2e method) contains this
    python benchmarks/plot_history.py --add benchmarks/results/<run>   # add a report folder (e.g. a GPU run's)

run_all.py adds its report folder itself when it writes into benchmarks/results/ (not under --quick).
--add also takes an unpacked gpu_run.sh bundle (`tar -xzf gpu_run.tar.gz`, then its gpu_run/ folder), whose
reports are in its bench/ folder. Adding is idempotent: a run
already in the history (same date, commit and device, whatever its folder is called) is left as it is.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
HISTORY = HERE / "results" / "history.jsonl"
_RUN_FIELDS = ("date", "commit", "device", "device_name", "torch", "cuda")


def records(report_dir: Path) -> list[dict]:
    """The history lines of one report folder: a line per microbenchmark row and per end-to-end result."""
    lines = []
    micro = report_dir / "results.json"
    if micro.exists():
        data = json.loads(micro.read_text())
        env = data["environment"]
        run = dict(run=report_dir.name, kind="micro", **{k: env.get(k) for k in _RUN_FIELDS},
                   copy_gbps=(env.get("copy_bandwidth") or {}).get("gbps"))
        for row in data["rows"]:
            lines.append(dict(run, **{k: row.get(k) for k in ("op", "shape", "dtype", "primary", "median_ms",
                                                                "spread", "gbps", "pct_copy", "speedup")}))
    e2e = report_dir / "e2e.json"
    if e2e.exists():
        data = json.loads(e2e.read_text())
        env = data["environment"]
        run = dict(run=report_dir.name, kind="e2e", **{k: env.get(k) for k in _RUN_FIELDS},
                   model=env.get("model"), dtype=env.get("dtype"), prompt_len=env.get("prompt_len"),
                   new_tokens=env.get("new_tokens"))
        for row in data["results"]:
            lines.append(dict(run, **{k: row.get(k) for k in ("batch", "method", "tokens_per_s", "source")}))
    return lines


def load(history: Path = HISTORY) -> list[dict]:
    if not history.exists():
        return []
    return [json.loads(line) for line in history.read_text().splitlines() if line.strip()]


def _run_identity(line: dict) -> tuple:
    return line["kind"], line["date"], line["commit"], line["device"]


def report_folder(path: Path) -> Path | None:
    """The folder holding the reports: `path` itself, or the bench/ folder of a gpu_run.sh bundle."""
    for folder in (path, path / "bench"):
        if (folder / "results.json").exists() or (folder / "e2e.json").exists():
            return folder
    return None


def add_report(report_dir: Path, history: Path = HISTORY) -> int:
    """Appends a report folder's results to the history unless that run is there already; returns the
    number of lines added."""
    known = {_run_identity(line) for line in load(history)}
    new = [line for line in records(report_dir) if _run_identity(line) not in known]
    if new:
        history.parent.mkdir(parents=True, exist_ok=True)
        with history.open("a") as out:
            out.writelines(json.dumps(line, default=str) + "\n" for line in new)
    return len(new)


def _series_key(line: dict) -> tuple:
    if line["kind"] == "micro":
        shape = ",".join(f"{k}={v}" for k, v in line["shape"].items())
        return ("micro", line["op"], shape, line["dtype"], line["device_name"])
    model = line.get("model") or {}
    size = f"{model.get('layers')}x{model.get('hidden')}, prompt {line.get('prompt_len')}, new {line.get('new_tokens')}"
    return ("e2e", line["method"], f"batch={line['batch']}, {size}", line["dtype"], line["device_name"])


def series(lines: list[dict], op: str | None = None) -> dict[tuple, list[dict]]:
    """Results grouped by (kind, op or method, shape, dtype, device name), each in date order."""
    grouped = defaultdict(list)
    for line in lines:
        key = _series_key(line)
        if op is None or op in key[1]:
            grouped[key].append(line)
    return {key: sorted(points, key=lambda p: (p["date"] or "", p["run"])) for key, points in grouped.items()}


def table(grouped: dict[tuple, list[dict]]) -> str:
    out = []
    for (kind, name, shape, dtype, device), points in grouped.items():
        out.append(f"{name} ({shape}) {dtype} on {device}:")
        for p in points:
            if kind == "micro":
                median = f"{p['median_ms']:.3f} ms" if p.get("median_ms") is not None else "primary skipped"
                pct = f", {p['pct_copy']:.1f}% copy" if p.get("pct_copy") is not None else ""
                peers = ", ".join(f"{peer} {ratio:.2f}x" for peer, ratio in (p.get("speedup") or {}).items()
                                  if ratio is not None)
                out.append(f"  {p['date']}  {p['commit']:<18} {median}{pct}{'; ' + peers if peers else ''}")
            else:
                tps = f"{p['tokens_per_s']:.1f} tokens/s" if p.get("tokens_per_s") else "-"
                out.append(f"  {p['date']}  {p['commit']:<18} {tps} ({p.get('source')})")
    return "\n".join(out)


def plot(grouped: dict[tuple, list[dict]], out_dir: Path) -> list[Path]:
    """One PNG per op (microbenchmarks: median time; end to end: tokens/s), a line per series."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    by_figure = defaultdict(list)
    for key, points in grouped.items():
        by_figure["e2e" if key[0] == "e2e" else key[1]].append((key, points))
    written = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, lines in by_figure.items():
        fig, ax = plt.subplots(figsize=(8, 4.5))
        value = "tokens_per_s" if name == "e2e" else "median_ms"
        for (kind, label, shape, dtype, device), points in lines:
            points = [p for p in points if p.get(value) is not None and p.get("date")]
            if points:
                ax.plot([datetime.strptime(p["date"], "%Y-%m-%d %H:%M UTC") for p in points],
                        [p[value] for p in points], marker="o",
                        label=f"{label + ' ' if kind == 'e2e' else ''}{shape} {dtype} ({device})")
        ax.set_ylabel("generated tokens / s" if name == "e2e" else "median time (ms)")
        ax.set_yscale("log")
        ax.set_title(f"{name}: history")
        ax.tick_params(axis="x", labelrotation=60, labelsize=6)
        ax.legend(fontsize=5)
        fig.tight_layout()
        path = out_dir / f"history_{name.replace('.', '_')}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--history", type=Path, default=HISTORY)
    parser.add_argument("--add", type=Path, nargs="+", default=[], help="report folders to add first")
    parser.add_argument("--op", default=None, help="only series whose op (or e2e method) contains this")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "plots", help="folder for the PNGs")
    args = parser.parse_args()
    for path in args.add:
        report_dir = report_folder(path)
        if report_dir is None:
            print(f"--add {path}: no results.json or e2e.json there or in its bench/ folder", file=sys.stderr)
            return 2
        print(f"{report_dir}: {add_report(report_dir, args.history)} lines added to {args.history}")
    grouped = series(load(args.history), args.op)
    print(table(grouped) or f"no results in {args.history}")
    written = plot(grouped, args.out)
    print("\n".join(f"plot: {path}" for path in written) or "matplotlib not installed: no plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
