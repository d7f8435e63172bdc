"""R2LM demo: build a small random-weight model, generate with block diffusion and an exact KV cache, check
the cacheability invariant live, and compare throughput with the autoregressive and bidirectional baselines.

    python -m r2lm_kernels.demo                 # CPU, or the GPU when one is present
    python -m r2lm_kernels.demo --quick         # a few seconds
    python -m r2lm_kernels.demo --device cuda --size medium --batch 32

The weights are random, so the text is meaningless and model confidence says nothing: every method runs a
fixed tokens-per-step policy (threshold = inf, min = max = k tokens a step), which makes steps and throughput
independent of the weights. --threshold T switches to the confidence-threshold rule instead.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import compiled_backends
from .config import R2LMConfig
from .generate import autoregressive_generate, bidirectional_generate, generate
from .model import R2LMForCausalLM

SIZES = {
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64),
    "small": dict(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    "medium": dict(vocab_size=32000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                   num_attention_heads=16, num_key_value_heads=8, head_dim=64),
    "qwen3-1.7b": {},
}


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m r2lm_kernels.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="model shape (default: small on CPU, "
                   "medium on GPU)")
    p.add_argument("--quick", action="store_true", help="tiny model, short run (a few seconds)")
    p.add_argument("--batch", type=positive_int, default=None,
                   help="sequences generated together (default 4; 16 on GPU)")
    p.add_argument("--prompt-len", type=positive_int, default=None, help="longest prompt; the others are shorter")
    p.add_argument("--new-tokens", type=positive_int, default=None, help="tokens generated per sequence")
    p.add_argument("--block-size", type=positive_int, default=32)
    p.add_argument("--tokens-per-step", type=positive_int, default=4, help="k of the fixed policy")
    p.add_argument("--threshold", type=float, default=None, help="use the confidence-threshold rule instead")
    p.add_argument("--impl", choices=["kernels", "reference"], default="kernels")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--no-cuda-graph", action="store_true", help="GPU: run decode steps eagerly")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class Progress:
    """A one-line progress display (redrawn in place on a terminal, else one line per block)."""

    def __init__(self, label, total):
        self.label, self.total, self.tty = label, total, sys.stdout.isatty()
        self.last_blocks, self.note = -1, ""

    def update(self, done, step, blocks, note=""):
        width = 30
        filled = int(width * done / max(self.total, 1))
        line = (f"  {self.label:<6} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} tokens, "
                f"step {step}{note}")
        if self.tty:
            sys.stdout.write("\r" + line + "\033[K")
            sys.stdout.flush()
        elif blocks != self.last_blocks:
            print(line, flush=True)
        self.last_blocks = blocks

    def close(self):
        if self.tty:
            sys.stdout.write("\n")


def checked_run(model, prompts, kwargs, tolerance):
    """Generates with a callback that, at every step, recomputes [committed blocks + current block] of every
    active sequence from scratch without the cache (one right-padded batch: causal attention and the
    block-local sidecar make the padding invisible) and compares the logits.
    Returns (worst relative difference, number of checked sequence-steps)."""
    mask, bs = model.config.mask_token_id, model.config.block_size
    lengths = [len(p) for p in prompts]
    budget = kwargs["max_new_tokens"]
    progress = Progress("R2LM", budget * len(prompts))
    worst, checked = [0.0], [0]

    def on_step(info):
        starts = info.block_start.tolist()
        active = [b for b in range(len(prompts)) if bool(info.active[b])]
        if active:
            width = max(starts[b] for b in active) + bs
            canvases = torch.full((len(active), width), mask, dtype=torch.int64, device=info.block.device)
            for row, b in enumerate(active):
                canvases[row, : starts[b]] = info.canvas[b, : starts[b]]
                n = min(bs, lengths[b] + budget - starts[b])   # past the budget the model reads [MASK]
                canvases[row, starts[b]: starts[b] + n] = info.block[b, :n]
            fresh = model(canvases).float()
            for row, b in enumerate(active):
                ref = fresh[row, starts[b]: starts[b] + bs]
                diff = float((ref - info.logits[b].float()).abs().max() / ref.abs().max().clamp_min(1e-30))
                worst[0] = max(worst[0], diff)
                checked[0] += 1
        position = info.block_start[:, None] + torch.arange(bs, device=info.block.device)
        prompt_len = torch.tensor(lengths, device=info.block.device)[:, None]
        behind = (torch.minimum(info.block_start, prompt_len[:, 0] + budget) - prompt_len[:, 0]).clamp_min(0)
        in_block = (info.block != mask) & (position >= prompt_len) & (position < prompt_len + budget)
        note = (f", cache invariant {'ok' if worst[0] <= tolerance else 'VIOLATED'} "
                f"(max rel diff {worst[0]:.1e} over {checked[0]} checks)")
        progress.update(int(behind.sum() + in_block.sum()), info.index + 1, sum(starts), note)
        progress.note = note

    out = generate(model, prompts, step_callback=on_step, **kwargs)
    progress.update(out.stats.total_generated, out.stats.forward_passes, -1, progress.note)
    progress.close()
    return worst[0], checked[0]


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    on_gpu = device.type == "cuda"
    if on_gpu and not compiled_backends().get("cuda"):
        sys.exit("this build of r2lm_kernels has no CUDA kernels; run with --device cpu")
    size = args.size or ("tiny" if args.quick else ("medium" if on_gpu else "small"))
    dtype = {"auto": torch.bfloat16 if on_gpu else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    batch = args.batch or (16 if on_gpu else 4)  # the sizes are None or positive
    prompt_len = args.prompt_len or (256 if on_gpu else (20 if args.quick else 48))
    new_tokens = args.new_tokens or (256 if on_gpu else (32 if args.quick else 64))
    k = args.tokens_per_step
    torch.manual_seed(args.seed)

    config = R2LMConfig(**{**SIZES[size], "block_size": args.block_size,
                           "max_position_embeddings": max(4096, prompt_len + new_tokens)})
    model = R2LMForCausalLM(config, impl=args.impl, device=device)
    # A random sidecar out_proj (a converted model starts at zero), so the sidecar shapes the logits and the
    # invariant check below means something.
    model.init_weights(std=0.02, sidecar_out_std=0.02)
    model = model.cast(dtype).eval()
    # Prompts of different lengths: each sequence has its own block layout and advances on its own.
    lengths = [max(1, prompt_len - (7 * i) % args.block_size) for i in range(batch)]
    prompts = [torch.randint(0, config.vocab_size - 1, (n,), device=device) for n in lengths]

    if args.threshold is None:
        policy = dict(threshold=float("inf"), min_per_step=k, max_per_step=k)
        policy_text = f"fixed {k} tokens/step (threshold=inf, min=max={k})"
    else:
        policy = dict(threshold=args.threshold, min_per_step=1)
        policy_text = f"threshold {args.threshold} (at least 1 token/step)"
    use_graph = on_gpu and args.impl == "kernels" and not args.no_cuda_graph
    n_params = sum(p.numel() for p in model.parameters())
    print(f"R2LM demo on {torch.cuda.get_device_name(device) if on_gpu else 'CPU'} "
          f"(torch {torch.__version__}, impl={args.impl}, {dtype}, CUDA graphs {'on' if use_graph else 'off'})")
    backends = compiled_backends()
    print(f"r2lm kernels compiled in: CPU{', CUDA (' + backends['cuda_archs'] + ')' if backends['cuda'] else ''}")
    print(f"model '{size}': {n_params / 1e6:.1f}M random parameters, {config.num_hidden_layers} layers, "
          f"hidden {config.hidden_size}, vocab {config.vocab_size}, block {config.block_size}")
    print(f"batch {batch}, prompt lengths {min(lengths)}..{max(lengths)}, {new_tokens} new tokens each, "
          f"policy: {policy_text}\n")

    common = dict(max_new_tokens=new_tokens)
    r2lm_kwargs = dict(common, **policy)
    tolerance = 1e-4

    # 1. Generation with the live cache-invariant check (the progress display), in float32 so that the
    # tolerance separates rounding from a broken cache.
    print("generating with the KV cache (float32); each step re-checked against a cache-free forward:", flush=True)
    worst, checked = checked_run(model.float(), prompts, r2lm_kwargs, tolerance)
    model.cast(dtype)

    # 2. Timed runs (warmed up once, no callbacks).
    runs = {
        "R2LM (KV cache + sidecar)": lambda: generate(model, prompts, cuda_graph=use_graph, **r2lm_kwargs),
        "autoregressive (KV cache)": lambda: autoregressive_generate(model, prompts, cuda_graph=use_graph, **common),
        "bidirectional dLLM (no cache)": lambda: bidirectional_generate(model, prompts, cuda_graph=use_graph,
                                                                         **r2lm_kwargs),
    }
    results = {}
    print("\ntimed runs:", flush=True)
    for name, run in runs.items():
        run()  # warm-up: first-call costs, and the CUDA graph's memory pool
        start = time.perf_counter()
        out = run()
        results[name] = (out.stats, time.perf_counter() - start)
        print(f"  {name}: {out.stats.wall_time:.2f} s", flush=True)

    r2lm_tps = results["R2LM (KV cache + sidecar)"][0].tokens_per_second
    print(f"\n{'method':<31} {'steps/seq':>9} {'tokens/step':>11} {'passes':>7} {'tokens/s':>10} "
          f"{'R2LM speedup':>12}")
    for name, (stats, _) in results.items():
        steps = float(stats.steps.float().mean())
        speedup = r2lm_tps / stats.tokens_per_second
        print(f"{name:<31} {steps:>9.1f} {stats.tokens_per_step:>11.2f} {stats.forward_passes:>7d} "
              f"{stats.tokens_per_second:>10.1f} {speedup:>11.2f}x")
    held = worst <= tolerance
    print(f"\ncache invariant on this run: {'HELD' if held else 'VIOLATED'} - logits of {checked} cached steps vs "
          f"cache-free forwards of [committed blocks + current block]: max relative difference {worst:.2e} "
          f"(tolerance {tolerance:.0e}, float32)")
    print("(passes: batched forward passes of the decode loop; R2LM's include one clean pass per finished block."
          + ("" if on_gpu else " On a CPU every position costs compute: a block pass that commits a few tokens "
             "pays for all its positions. Parallel decoding pays where decoding is bound by reading weights and "
             "the cache: the GPU, batch serving.") + ")")
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
