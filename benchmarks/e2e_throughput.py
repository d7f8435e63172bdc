"""End-to-end generation throughput: R2LM block diffusion vs autoregressive decoding vs a bidirectional
dLLM on the same network, with a fixed tokens-per-step policy (threshold=inf, exactly k tokens a step),
so the figures do not depend on the (random) weights.

GPU (default): the Qwen3-1.7B shape (28 layers, hidden 2048, 16/8 heads, head_dim 128, vocab 151,936),
bf16, batch 1/16/64/256, prompt 512, 256 new tokens, block 32, R2LM and the dLLM at 4 tokens a step.
CPU: a small shape and small batches (--quick: smaller still, for CI).

Two measurements per (method, batch):
* full: timed calls of r2lm_kernels.generate / autoregressive_generate / bidirectional_generate (after a
  one-block warm-up call at the same batch), CUDA-graphed decode steps on CUDA; tokens/s =
  generated tokens / wall time of a call, prefill included, the median of up to FULL_RUNS calls with fresh
  prompts (fewer where the budget is short). Run when its predicted time fits the budget.
* step model (always): the decode step itself timed at the first and the last context length of the run
  (CUDA-graph replays on CUDA, so the step's launch overhead is what a cuda_graph=True call pays), plus
  the prefill; the total is prefill + the sum of all steps, step cost linear in the context length
  (attention over the cache is the only part that grows). Where the full run was skipped (too slow for the
  budget), the table reports this extrapolation and says so; where both exist it shows how well they agree.
The per-step ratio is the R2LM block step (32 queries, sidecar, commit over 32 x vocab logits) over the AR
step (1 query, no sidecar) at the prompt's context length.

    python benchmarks/e2e_throughput.py --out DIR [--device cuda] [--quick] [--budget-s 240]

Exit code 1 when a step timing or a full run failed for any reason but the device running out of memory.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

METHODS = ("r2lm", "ar", "bidirectional")
LABELS = {"r2lm": "R2LM (block diffusion, KV cache)", "ar": "autoregressive (KV cache)",
          "bidirectional": "bidirectional dLLM (no cache)"}


@dataclass
class Setup:
    config_overrides: dict
    dtype: torch.dtype
    batches: list
    prompt_len: int
    new_tokens: int
    tokens_per_step: int


def setup_for(device: str, quick: bool) -> Setup:
    if device == "cuda":
        return Setup({}, torch.bfloat16, [1, 16] if quick else [1, 16, 64, 256], 512, 256, 4)
    small = dict(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True)
    if not quick:
        small.update(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4)
    return Setup(small, torch.float32, [1, 2] if quick else [1, 4, 8], 32 if quick else 64,
                 32 if quick else 64, 4)


def build_model(setup: Setup, device: str, impl: str):
    from r2lm_kernels.config import R2LMConfig
    from r2lm_kernels.model import R2LMForCausalLM
    config = R2LMConfig.qwen3_1_7b(block_size=32, **setup.config_overrides)
    with torch.device(device):  # initialise on the device: CPU-side init of 1.7B weights takes minutes
        model = R2LMForCausalLM(config, impl=impl)
        # A live (non-zero) sidecar output projection: timing on zero weights can flatter.
        model.init_weights(sidecar_out_std=0.02)
    return model.cast(setup.dtype).eval()


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def random_prompts(model, batch, prompt_len):
    # Any token but the mask (the last id).
    return torch.randint(0, model.config.mask_token_id, (batch, prompt_len), device=model.device)


def policy(setup: Setup) -> dict:
    k = setup.tokens_per_step
    return dict(threshold=float("inf"), min_per_step=k, max_per_step=k)


def generate_call(method, model, prompts, new_tokens, setup, cuda_graph):
    from r2lm_kernels.generate import autoregressive_generate, bidirectional_generate, generate
    if method == "r2lm":
        return generate(model, prompts, max_new_tokens=new_tokens, cuda_graph=cuda_graph, **policy(setup))
    if method == "ar":
        return autoregressive_generate(model, prompts, max_new_tokens=new_tokens, cuda_graph=cuda_graph)
    return bidirectional_generate(model, prompts, max_new_tokens=new_tokens, cuda_graph=cuda_graph,
                                  **policy(setup))


FULL_RUNS = 3  # timed generate calls per (method, batch) where they fit the budget: a median and a spread


def full_run(method, model, batch, setup, device, another_fits) -> dict:
    """One warm-up call generating one block, then timed calls, each with fresh prompts: up to FULL_RUNS,
    while another_fits(seconds of the last call) says one more fits the budget."""
    cuda_graph = device == "cuda"
    bs = model.config.block_size
    generate_call(method, model, random_prompts(model, batch, setup.prompt_len), bs, setup, cuda_graph)
    samples = []
    while True:
        prompts = random_prompts(model, batch, setup.prompt_len)
        synchronize(device)
        started = time.perf_counter()
        out = generate_call(method, model, prompts, setup.new_tokens, setup, cuda_graph)
        synchronize(device)
        samples.append(time.perf_counter() - started)
        generated = out.stats.total_generated
        if generated != batch * setup.new_tokens:
            raise RuntimeError(f"{method}: generated {generated} tokens, expected {batch * setup.new_tokens}")
        if len(samples) == FULL_RUNS or not another_fits(samples[-1]):
            break
    timing = harness.Timing.of(samples)  # with up to 3 samples its spread is (max - min) / median
    return dict(seconds=timing.median_s, tokens_per_s=generated / timing.median_s, runs=len(samples),
                spread=timing.spread, forward_passes=out.stats.forward_passes, cuda_graph=cuda_graph)


class StepTimer:
    """Times one decode step of each method at a given context, the way the generators run it: graph replays
    on CUDA, eager on CPU."""

    def __init__(self, model, batch, setup, device, budget):
        self.model, self.batch, self.setup, self.device, self.budget = model, batch, setup, device, budget
        config = model.config
        self.mask = config.mask_token_id
        max_len = setup.prompt_len + setup.new_tokens + config.block_size
        self.cache = model.allocate_cache(batch, max_len)
        # Random cache contents (the timed steps attend to them; never time on zeros).
        for layer in self.cache.k + self.cache.v:
            layer.normal_()

    def _block(self, width, masked_from):
        tokens = random_prompts(self.model, self.batch, width)
        tokens[:, masked_from:] = self.mask
        return tokens

    def _time(self, step, graph: bool) -> harness.Timing:
        if graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured):
                step()
            run = captured.replay
        else:
            run = step
        # Steps range from microseconds to a second: size the repetitions from a first (warm) call.
        first_s = harness.first_call(run, self.device)
        reps = max(self.budget.min_reps, min(self.budget.max_reps, int(self.budget.measure_s / first_s)))
        if self.device != "cuda":
            return harness.Timing.of([harness.first_call(run, self.device) for _ in range(reps)])
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for begin, end in events:
            begin.record()
            run()
            end.record()
        torch.cuda.synchronize()
        return harness.Timing.of([b.elapsed_time(e) / 1e3 for b, e in events])

    @torch.inference_mode()
    def r2lm_block(self, context: int) -> harness.Timing:
        """A denoising step of a 32-token block at `context` committed tokens: block forward through the
        cache (sidecar on) + parallel_commit. The block is restored before each commit, so every replay
        does the same work."""
        model, bs = self.model, self.model.config.block_size
        start = self._block(bs, bs // 2)
        block = start.clone()
        active = torch.ones(self.batch, dtype=torch.bool, device=model.device)
        self.cache.seqlens.fill_(context)

        def step():
            logits = model.logits(model.hidden_states(block, cache=self.cache))
            block.copy_(start)
            model.ops.parallel_commit(logits, block, mask_token_id=self.mask, active=active, **policy(self.setup))
        return self._time(step, graph=self.device == "cuda")

    @torch.inference_mode()
    def ar_token(self, context: int) -> harness.Timing:
        """An autoregressive step at `context`: one token through the cache (no sidecar) + the choice of the
        next token (parallel_commit on one position, as autoregressive_generate does)."""
        model = self.model
        token = self._block(1, 1)
        proposal = torch.full_like(token, self.mask)
        active = torch.ones(self.batch, dtype=torch.bool, device=model.device)
        self.cache.seqlens.fill_(context)

        def step():
            logits = model.logits(model.hidden_states(token, cache=self.cache, sidecar=False))
            proposal.fill_(self.mask)
            model.ops.parallel_commit(logits, proposal, mask_token_id=self.mask, threshold=float("-inf"),
                                      min_per_step=1, max_per_step=1, active=active)
        return self._time(step, graph=self.device == "cuda")

    @torch.inference_mode()
    def bidirectional(self) -> harness.Timing:
        """A bidirectional dLLM step: the whole canvas (prompt + new tokens) with bidirectional attention,
        logits of the current block, parallel_commit."""
        model, bs = self.model, self.model.config.block_size
        width = self.setup.prompt_len + self.setup.new_tokens
        canvas = self._block(width, self.setup.prompt_len)
        pos = torch.arange(self.setup.prompt_len, self.setup.prompt_len + bs, device=model.device)
        active = torch.ones(self.batch, dtype=torch.bool, device=model.device)
        block = canvas[:, pos].clone()

        def step():
            hidden = model.hidden_states(canvas, causal=False, sidecar=False)
            logits = model.logits(hidden[:, pos])
            block.copy_(canvas[:, pos])
            model.ops.parallel_commit(logits, block, mask_token_id=self.mask, active=active, **policy(self.setup))
        return self._time(step, graph=self.device == "cuda")

    @torch.inference_mode()
    def prefill(self, sidecar: bool) -> harness.Timing:
        """The prompt's prefill into the cache (R2LM with the sidecar, AR without)."""
        model = self.model
        prompt = random_prompts(model, self.batch, self.setup.prompt_len)

        def step():
            model.hidden_states(prompt, cache=self.cache, prefill=True, sidecar=sidecar)
        return self._time(step, graph=False)


def decode_passes(method: str, new_tokens: int, block_size: int, tokens_per_step: int) -> int:
    """Model passes after the prefill that generation runs (prompt a whole number of blocks, no EOS).
    R2LM: per block its denoising steps, then a clean pass writing the finished block's K/V (none after the
    last block); AR: the prefill's logits pick the first token, then one pass per further token; the
    bidirectional dLLM: one full-canvas pass per step."""
    blocks = math.ceil(new_tokens / block_size)
    if method == "r2lm":
        return blocks * math.ceil(block_size / tokens_per_step) + blocks - 1
    if method == "ar":
        return new_tokens - 1
    return blocks * math.ceil(block_size / tokens_per_step)


def step_model(timer: StepTimer, setup: Setup, block_size: int) -> dict:
    """Per-step times and the extrapolated generation time of each method (see the module docstring)."""
    p, n, k = setup.prompt_len, setup.new_tokens, setup.tokens_per_step
    first, last = p, p + n - block_size  # context of the first and the last R2LM block
    timings = dict(r2lm_first=timer.r2lm_block(first), r2lm_last=timer.r2lm_block(last), ar_first=timer.ar_token(p),
                   ar_last=timer.ar_token(p + n - 2), bidirectional=timer.bidirectional(),
                   prefill_r2lm=timer.prefill(True), prefill_ar=timer.prefill(False))
    step_s = {name: t.median_s for name, t in timings.items()}
    r2lm, ar = (step_s["r2lm_first"], step_s["r2lm_last"]), (step_s["ar_first"], step_s["ar_last"])
    bidir, prefill_r2lm, prefill_ar = step_s["bidirectional"], step_s["prefill_r2lm"], step_s["prefill_ar"]
    passes = {method: decode_passes(method, n, block_size, k) for method in METHODS}
    totals = {
        "r2lm": prefill_r2lm + passes["r2lm"] * sum(r2lm) / 2,
        "ar": prefill_ar + passes["ar"] * sum(ar) / 2,
        "bidirectional": passes["bidirectional"] * bidir,
    }
    return dict(step_s=step_s, step_spread={name: t.spread for name, t in timings.items()},
                total_s=totals, block_step_over_ar_step=r2lm[0] / ar[0])


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"


def _out_of_memory(error: Exception) -> bool:
    """The largest batches may not fit the device: reported in the table, not a failure of the run."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def environment(device: str, setup: Setup, model, impl: str) -> dict:
    env = harness.environment(device, None)
    env.pop("copy_bandwidth")
    c = model.config
    env.update(model=dict(layers=c.num_hidden_layers, hidden=c.hidden_size, heads=c.num_attention_heads,
                          kv_heads=c.num_key_value_heads, head_dim=c.head_dim, vocab=c.vocab_size,
                          intermediate=c.intermediate_size, block_size=c.block_size,
                          params=sum(p.numel() for p in model.parameters())),
               dtype=str(setup.dtype).removeprefix("torch."), prompt_len=setup.prompt_len,
               new_tokens=setup.new_tokens, tokens_per_step=setup.tokens_per_step, batches=setup.batches, impl=impl)
    return env


def markdown(env: dict, results: list, steps: dict, notes: list) -> str:
    m = env["model"]
    lines = [
        f"# End-to-end generation throughput — {env['device_name']} ({env['device']})",
        "",
        f"- date: {env['date']}; commit: `{env['commit']}`; torch {env['torch']}, CUDA {env['cuda']}, "
        f"Python {env['python']}",
        f"- model: {m['layers']} layers, hidden {m['hidden']}, {m['heads']}/{m['kv_heads']} heads, head_dim "
        f"{m['head_dim']}, vocab {m['vocab']}, {m['params'] / 1e6:.1f} M params, random weights, {env['dtype']}, "
        f"ops impl={env['impl']}",
        f"- prompt {env['prompt_len']}, {env['new_tokens']} new tokens, block {m['block_size']}; R2LM and the dLLM "
        f"commit exactly {env['tokens_per_step']} tokens a step (threshold=inf), AR 1 token a step",
        "- tokens/s = generated tokens / generation time (prefill included). 'full': the median of up to "
        f"{FULL_RUNS} timed generate calls (as many as the time budget allowed; the source column gives their "
        "count and spread, (max - min) / median); "
        "'extrapolated': prefill + sum of per-step times measured at the first and last context (linear in "
        "context), used where the full call did not fit the time budget. A CUDA-graphed generate call captures "
        "its step graph inside the call, and that capture is in its time; the step model times replays only. "
        "Step times are medians; their spread is (p90 - p10) / median (the table shows each batch's largest)",
        "",
        "| batch | method | tokens/s | time (s) | source | step-model tokens/s | R2LM speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    by_key = {(r["batch"], r["method"]): r for r in results}
    for r in results:
        speedup = ""
        if r["method"] != "r2lm":
            value, source = r2lm_ratio(by_key, r["batch"], r["method"])
            if value is not None:
                speedup = f"{value:.2f}x" + (" (step model)" if source == "step model" else "")
        tps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"
        secs = f"{r['seconds']:.2f}" if r.get("seconds") else "-"
        model_tps = f"{r['step_model_tokens_per_s']:.0f}" if r.get("step_model_tokens_per_s") else "-"
        source = r.get("source", "-")
        if source == "full" and r.get("runs", 1) > 1:
            source = f"full ({r['runs']} runs, spread {100 * r['spread']:.0f}%)"
        lines.append(f"| {r['batch']} | {LABELS[r['method']]} | {tps} | {secs} | {source} | "
                     f"{model_tps} | {speedup} |")
    lines += ["", "Per-step times (ms; R2LM block step = 32 queries + sidecar + commit; at the prompt's context "
              "unless noted):", "",
              "| batch | R2LM block step | AR token step | block / AR step | R2LM block (last ctx) | AR (last ctx) "
              "| dLLM step | prefill | largest spread |", "|---|---|---|---|---|---|---|---|---|"]
    for batch, s in steps.items():
        t = s["step_s"]
        spread = max(s["step_spread"].values())
        lines.append(f"| {batch} | {1e3 * t['r2lm_first']:.2f} | {1e3 * t['ar_first']:.2f} | "
                     f"{s['block_step_over_ar_step']:.2f}x | {1e3 * t['r2lm_last']:.2f} | {1e3 * t['ar_last']:.2f} | "
                     f"{1e3 * t['bidirectional']:.2f} | {1e3 * t['prefill_r2lm']:.1f} | {100 * spread:.0f}% |")
    targets = target_checks(env, results, steps)
    if targets:
        lines += ["", f"Targets (set for an H100 in bf16; measured on {env['device_name']}):",
                  *[f"- {t}" for t in targets]]
    if notes:
        lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def r2lm_ratio(by_key: dict, batch: int, method: str):
    """(R2LM's tokens/s over the method's, where both come from): full runs when both have one, else the
    step model (a full run includes its CUDA-graph capture, the step model times replays: never mixed)."""
    ours, theirs = by_key.get((batch, "r2lm"), {}), by_key.get((batch, method), {})
    if ours.get("source") == theirs.get("source") == "full":
        return ours["tokens_per_s"] / theirs["tokens_per_s"], "full runs"
    if ours.get("step_model_tokens_per_s") and theirs.get("step_model_tokens_per_s"):
        return ours["step_model_tokens_per_s"] / theirs["step_model_tokens_per_s"], "step model"
    return None, None


def target_checks(env, results, steps) -> list:
    if env["device"] != "cuda" or env["dtype"] != "bfloat16":
        return []
    by_key = {(r["batch"], r["method"]): r for r in results}
    checks = []

    def check(label, value, goal, at_most=False):
        if value is None:
            checks.append(f"{label}: not measured")
        else:
            ok = value <= goal if at_most else value >= goal
            checks.append(f"{label}: {value:.2f}x ({'meets' if ok else 'MISSES'} {'<=' if at_most else '>='} {goal}x)")

    for b in (1, 16, 64):
        if b in env["batches"]:
            value, source = r2lm_ratio(by_key, b, "ar")
            check(f"R2LM / AR tokens/s at batch {b}" + (f" ({source})" if source else ""), value, 3)
    if 64 in env["batches"]:
        value, source = r2lm_ratio(by_key, 64, "bidirectional")
        check("R2LM / bidirectional dLLM tokens/s at batch 64" + (f" ({source})" if source else ""), value, 13)
    for b in (1, 16):
        if b in steps:
            check(f"32-token block step / AR step at batch {b}", steps[b]["block_step_over_ar_step"], 1.3, at_most=True)
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budget-s", type=float, default=None, help="time to plan for (default: 600 GPU, 120 CPU)")
    parser.add_argument("--impl", choices=["kernels", "reference"], default="kernels")
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    setup = setup_for(device, args.quick)
    if args.batches:
        setup.batches = args.batches
    budget_s = args.budget_s or (600 if device == "cuda" else 60 if args.quick else 120)
    out = args.out or HERE / "results" / f"latest-{device}"
    out.mkdir(parents=True, exist_ok=True)
    step_budget = harness.Budget(measure_s=0.1 if args.quick else 0.3, min_reps=2, max_reps=50)

    model = build_model(setup, device, args.impl)
    env = environment(device, setup, model, args.impl)
    print(f"== model ready after {time.perf_counter() - started:.0f} s: {env['model']}", flush=True)
    results, steps, notes = [], {}, []
    failures = []  # errors other than running out of memory: they make the exit code non-zero

    def left():
        return budget_s - (time.perf_counter() - started)

    def save():
        env["elapsed_s"] = time.perf_counter() - started
        (out / "e2e.json").write_text(json.dumps(dict(environment=env, results=results, steps=steps, notes=notes),
                                                 indent=1, default=str))
        (out / "e2e.md").write_text(markdown(env, results, steps, notes))

    for batch_index, batch in enumerate(setup.batches):
        if left() < 10:
            notes.append(f"batch {batch}: skipped, time budget spent")
            continue
        try:
            timer = StepTimer(model, batch, setup, device, step_budget)
            steps[batch] = step_model(timer, setup, model.config.block_size)
        except Exception as error:  # e.g. out of memory at the largest batch: report it, go on
            notes.append(f"batch {batch}: step timing failed: {_first_line(error)}")
            steps.pop(batch, None)
            if not _out_of_memory(error):
                failures.append(f"batch {batch} step timing")
        finally:
            timer = None
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        for method_index, method in enumerate(METHODS):
            row = dict(batch=batch, method=method)
            rows_left = (len(setup.batches) - batch_index) * len(METHODS) - method_index  # this one included
            if batch in steps:
                predicted = steps[batch]["total_s"][method]
                row["step_model_s"] = predicted
                row["step_model_tokens_per_s"] = batch * setup.new_tokens / predicted
            else:
                predicted = None
            # A full call with its one-block warm-up costs about 1.2x the prediction; it may take up to half
            # of what is left.
            if predicted is None and left() < 30:
                row.update(source="skipped", why="no step timing and under 30 s of budget left")
            elif predicted is not None and 1.5 * predicted > left() / 2:
                row.update(source="extrapolated", seconds=predicted, tokens_per_s=row["step_model_tokens_per_s"])
                row["why"] = f"full run predicted {predicted:.1f} s; {left():.0f} s of budget left"
            else:
                try:
                    # A repetition may take a quarter of this row's share of what is left.
                    run = full_run(method, model, batch, setup, device,
                                   lambda seconds: seconds < left() / (4 * rows_left))
                    row.update(source="full", **run)
                except Exception as error:
                    row.update(source="failed", why=f"full run failed: {_first_line(error)}")
                    if not _out_of_memory(error):
                        failures.append(f"batch {batch} {method} full run")
                    if predicted is not None:
                        row.update(source="extrapolated", seconds=predicted,
                                   tokens_per_s=row["step_model_tokens_per_s"])
                finally:
                    gc.collect()
                    if device == "cuda":
                        torch.cuda.empty_cache()
            results.append(row)
            print(f"== batch {batch} {method}: {row.get('tokens_per_s', float('nan')):.1f} tokens/s "
                  f"({row.get('source')}; step model {row.get('step_model_tokens_per_s', float('nan')):.1f}) "
                  f"[{time.perf_counter() - started:.0f} s]", flush=True)
            save()
    notes += [f"batch {r['batch']} {r['method']}: {r['why']}" for r in results if r.get("why")]
    save()
    print((out / "e2e.md").read_text())
    if failures:
        print(f"== failed: {', '.join(failures)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
