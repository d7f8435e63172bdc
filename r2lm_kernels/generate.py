"""Generation: R2LM block diffusion with an exact KV cache, and the two baselines (DESIGN.md 2).

* `generate`: block diffusion. The cache is prefilled with the prompt's whole blocks; the active block is
  the prompt's tail plus [MASK]s; each step runs the model on the active block (cache + block) and
  `parallel_commit` fills masked positions; a finished block runs once more clean, which writes its exact
  K/V into the cache, and `cache_seqlens += block_size`. Every sequence of the batch advances on its own.
* `autoregressive_generate`: the same network read as a next-token model (no sidecar), one token a step,
  with a KV cache.
* `bidirectional_generate`: a bidirectional dLLM (LLaDA-style): full bidirectional attention over the whole
  canvas every step, no cache, blocks of `block_size` counted from the end of each prompt.

A decode step is device work only (static shapes, in-place state): the host reads one flag per step, the
stop check. With `cuda_graph=True` (CUDA, impl="kernels") the step is captured once and replayed.
"""
from __future__ import annotations

import math
import numbers
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from .model import R2LMForCausalLM

__all__ = ["generate", "autoregressive_generate", "bidirectional_generate", "GenerationOutput", "GenerationStats",
           "StepInfo"]

Prompts = Union[torch.Tensor, Sequence[Sequence[int]], Sequence[torch.Tensor]]

# Per-sequence phase of block diffusion.
_DENOISE, _CLEAN, _DONE = 0, 1, 2


@dataclass
class GenerationStats:
    """prompt_lengths, num_generated, steps: per sequence (CPU int64 tensors). steps counts the forward
    passes that committed tokens for the sequence (denoising steps; AR: one per token). forward_passes
    counts batched model passes of the decode loop (clean passes included; the prefill excluded, except in
    AR where it yields the first token).
    wall_time (s) covers everything from the prompts' upload to the last token, device work included;
    prefill_time (s) is its part up to the end of the prefill (AR: and the first token; bidirectional: 0)."""

    prompt_lengths: torch.Tensor
    num_generated: torch.Tensor
    steps: torch.Tensor
    forward_passes: int
    wall_time: float
    prefill_time: float = 0.0

    @property
    def total_generated(self) -> int:
        return int(self.num_generated.sum())

    @property
    def tokens_per_step(self) -> float:
        """Generated tokens per denoising step, over the batch."""
        return self.total_generated / max(int(self.steps.sum()), 1)

    @property
    def tokens_per_second(self) -> float:
        return self.total_generated / self.wall_time if self.wall_time > 0 else float("inf")


@dataclass
class GenerationOutput:
    """sequences (batch, max_prompt_len + max_new_tokens): prompt then generated tokens, right-padded with
    pad_token_id past lengths[b] (generation ends after the first EOS); lengths (batch,) on the same device."""

    sequences: torch.Tensor
    lengths: torch.Tensor
    stats: GenerationStats

    def tolist(self) -> list:
        """Each sequence's tokens without padding."""
        return [row[:n].tolist() for row, n in zip(self.sequences.cpu(), self.lengths.cpu().tolist())]


@dataclass
class StepInfo:
    """What a step_callback sees before the step's commit. block: (batch, width) tokens the model just ran on
    (not yet updated by this step; in generate, positions past the budget hold the padding token and the
    model read [MASK] there); block_start: (batch,) absolute position of block[:, 0]; logits: (batch,
    width, vocab) for those positions; active: (batch,) sequences this step may commit in; canvas: the
    generator's token buffer (batch, >= prompt + budget), final before block_start[b] (a live view: copy what
    must outlive the callback). Reading these tensors' values synchronises with the device. In
    autoregressive_generate the block is the one token the model just ran on (the prompt's last at the first
    step) and its logits are next-token logits: the step chooses the token at block_start + 1."""

    index: int
    block: torch.Tensor
    block_start: torch.Tensor
    logits: torch.Tensor
    active: torch.Tensor
    canvas: torch.Tensor


# -- shared helpers ---------------------------------------------------------------------------------------

def _is_token_dtype(dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _prompt_batch(input_ids: Prompts, device, mask_token_id: int, pad: int, vocab_size: int):
    """(padded prompts (batch, max_len) int64 on device, lengths (batch,) int64 on the host)."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2 or not _is_token_dtype(input_ids.dtype) or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be an integer tensor (batch, prompt_len >= 1) or a list of "
                             f"sequences, got shape {tuple(input_ids.shape)} dtype {input_ids.dtype}")
        prompts = input_ids.to(device=device, dtype=torch.int64, copy=True)
        lengths = torch.full((prompts.shape[0],), prompts.shape[1], dtype=torch.int64)
    else:
        try:
            rows = [torch.as_tensor(r, device="cpu") for r in input_ids]
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"input_ids must be a 2-D integer tensor or a list of token id sequences: {error}") \
                from None
        if any(r.dim() == 0 for r in rows):
            raise ValueError("input_ids must be a 2-D tensor or a list of sequences, got a flat list of token ids: "
                             "wrap a single prompt as [ids]")
        if any(r.dim() > 1 for r in rows):
            raise ValueError(f"input_ids: each sequence in the list must be 1-D, got shapes "
                             f"{[tuple(r.shape) for r in rows if r.dim() > 1]}")
        bad = next((r.dtype for r in rows if not _is_token_dtype(r.dtype) and r.numel()), None)
        if bad is not None:
            raise ValueError(f"input_ids: every prompt must hold integer token ids, got {bad} values")
        rows = [r.to(torch.int64) for r in rows]
        if not rows:
            raise ValueError("input_ids holds no sequence")
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        if int(lengths.min()) < 1:
            raise ValueError("every prompt in input_ids needs at least one token")
        padded = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.int64)
        for i, r in enumerate(rows):
            padded[i, : len(r)] = r
        prompts = padded.to(device)
    if prompts.shape[0] == 0:
        raise ValueError("input_ids holds no sequence")
    if bool(((prompts < 0) | (prompts >= vocab_size)).any()):
        raise ValueError(f"input_ids holds token ids outside [0, vocab_size={vocab_size})")
    if bool((prompts == mask_token_id).any()):
        raise ValueError(f"input_ids contains mask_token_id={mask_token_id}; prompts must be clean tokens")
    return prompts, lengths


def _is_int(value) -> bool:
    """An integer (numpy's included), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_common(model, max_new_tokens, min_per_step, pad_token_id, eos_token_id):
    """Returns (padding token, max_new_tokens, min_per_step), the counts as Python ints."""
    if not isinstance(model, R2LMForCausalLM):
        hint = (" (torch.compile(model) wraps forward, which the generators do not call: compile "
                "model.hidden_states instead, see the README)" if hasattr(model, "_orig_mod") else "")
        raise TypeError(f"model must be an R2LMForCausalLM, got {type(model).__name__}{hint}")
    if not (_is_int(max_new_tokens) and max_new_tokens >= 1):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not (_is_int(min_per_step) and min_per_step >= 1):
        raise ValueError(f"min_per_step must be an int >= 1 (every step must make progress), got {min_per_step!r}")
    vocab = model.config.vocab_size
    for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if value is not None and not _is_int(value):
            raise TypeError(f"{name} must be one token id (an int), got {value!r}")
        if value is not None and not 0 <= value < vocab:
            raise ValueError(f"{name} must be in [0, vocab_size={vocab}), got {value}")
    if eos_token_id is not None and eos_token_id == model.config.mask_token_id:
        raise ValueError("eos_token_id must differ from mask_token_id (the mask token is never generated)")
    if pad_token_id is not None and pad_token_id == model.config.mask_token_id:
        raise ValueError("pad_token_id must differ from mask_token_id")
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    if pad == model.config.mask_token_id:
        raise ValueError("the padding token (pad_token_id, else eos_token_id, else 0) equals mask_token_id; "
                         "pass another pad_token_id")
    return int(pad), int(max_new_tokens), int(min_per_step)


def _sync(device):
    """Waits for the generator's work (all of it on the current stream). Not the whole device: a device-wide
    synchronisation would invalidate a graph capture that another thread's generator has under way."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _finish(canvas, prompt_len, gen_end, eos_token_id, pad, width):
    """Cuts each sequence after its first generated EOS; returns (sequences, lengths, num_generated)."""
    pos = torch.arange(canvas.shape[1], device=canvas.device)[None, :]
    end = gen_end.clone()
    if eos_token_id is not None:
        is_eos = (canvas == eos_token_id) & (pos >= prompt_len[:, None]) & (pos < gen_end[:, None])
        first = torch.where(is_eos, pos, torch.full_like(pos, canvas.shape[1])).amin(-1)
        end = torch.minimum(end, first + 1)
    sequences = torch.where(pos < end[:, None], canvas, torch.full_like(canvas, pad))[:, :width]
    return sequences, end, end - prompt_len


# PyTorch allows one CUDA graph capture at a time in a process; generators in several threads take turns.
_capture_lock = threading.Lock()


def _run_loop(step_fn, done_fn, max_iters, device, cuda_graph, what):
    """Runs step_fn until done_fn() (one host read per step); optionally as a replayed CUDA graph.
    Returns the number of steps run."""
    iters = 0
    graph = None
    # The warm-up and the capture run on a stream of the model's device: PyTorch's default capture stream
    # belongs to whichever device was current when it was made, and a capture there records nothing of a
    # model on another GPU.
    side = torch.cuda.Stream(device) if cuda_graph else None
    while not done_fn():
        if iters >= max_iters:
            raise RuntimeError(f"{what}: no progress after {max_iters} steps (non-finite logits?)")
        if graph is not None:
            graph.replay()
        elif cuda_graph and iters >= 1:
            # The first step ran eagerly (warm-up: kernels loaded, workspaces allocated); capture the next
            # one (capture records without running), then replay it for this and every later step.
            # (torch.cuda.graph synchronises the device first.) thread_local: CUDA calls that other threads of a
            # serving process make meanwhile (allocations, host reads of their own steps) neither break this
            # capture nor fail themselves.
            graph = torch.cuda.CUDAGraph()
            with _capture_lock, torch.cuda.device(device), \
                    torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                step_fn()
            graph.replay()
        elif cuda_graph:
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                step_fn()
            torch.cuda.current_stream(device).wait_stream(side)
        else:
            step_fn()
        iters += 1
    return iters


def _check_graph_args(model, cuda_graph, step_callback):
    if not cuda_graph:
        return
    if model.device.type != "cuda":
        raise ValueError("cuda_graph=True needs the model on a CUDA device")
    if model.impl != "kernels":
        raise ValueError("cuda_graph=True needs impl='kernels' (the reference ops read values on the host)")
    if step_callback is not None:
        raise ValueError("step_callback cannot run inside a captured CUDA graph; pass cuda_graph=False")


def _block_committer(ops, step_callback, canvas, steps, **commit):
    """The denoising step's commit shared by generate and bidirectional_generate, as a function
    commit(logits, block, block_start, active) -> n_masked: reports the step to step_callback (before the
    commit), runs ops.parallel_commit on block in place (commit: its keyword arguments; step: a device step
    counter), then counts a step in `steps` for each active row and advances the counter."""
    step_counter = torch.zeros(1, dtype=torch.int64, device=canvas.device)
    callback_index = [0]

    def commit_block(logits, block, block_start, active):
        if step_callback is not None:
            step_callback(StepInfo(callback_index[0], block.clone(), block_start.clone(), logits, active.clone(),
                                   canvas))
            callback_index[0] += 1
        _, _, n_masked = ops.parallel_commit(logits, block, step=step_counter, active=active, **commit)
        steps.add_(active.long())
        step_counter.add_(1)
        return n_masked
    return commit_block


# -- R2LM block diffusion ---------------------------------------------------------------------------------

@torch.inference_mode()
def generate(model: R2LMForCausalLM, input_ids: Prompts, *, max_new_tokens: int, threshold: float = 0.9,
             min_per_step: int = 1, max_per_step: int = 0, temperature: float = 0.0, seed: int = 0,
             eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None, use_cache: bool = True,
             score: str = "prob", sidecar: bool = True, cuda_graph: bool = False,
             step_callback: Optional[Callable[[StepInfo], None]] = None) -> GenerationOutput:
    """Block-diffusion generation with R2LM (DESIGN.md 2).

    input_ids: (batch, prompt_len) int tensor, or a list of sequences of different lengths. Each sequence
    gets max_new_tokens positions after its prompt; blocks are aligned to absolute positions. The commit
    rule is parallel_commit's (threshold / min_per_step / max_per_step / temperature / score; the random
    numbers are keyed by (seed, step, batch index, position)): e.g. threshold=float("inf"),
    min_per_step=max_per_step=k commits exactly k tokens a step. A sequence stops when a block containing a
    generated eos_token_id is complete, or at its budget; positions of its last block past the budget hold
    the padding token (pad_token_id, else eos_token_id, else 0) in the output and in StepInfo.block, and
    are [MASK] to the model, as in any active block, so that the padding does not change what is generated.
    use_cache=False recomputes the whole canvas each step under the same rules and schedule (a test of the
    cache: the same tokens in fp32 / fp64; 16-bit roundings may resolve a near tie differently).
    sidecar=False gives the causal block-diffusion baseline. step_callback(StepInfo) is called before every
    commit.
    """
    pad, max_new_tokens, min_per_step = _check_common(model, max_new_tokens, min_per_step, pad_token_id, eos_token_id)
    _check_graph_args(model, cuda_graph, step_callback)
    if cuda_graph and not use_cache:
        raise ValueError("cuda_graph=True needs use_cache=True")
    config, ops, device = model.config, model.ops, model.device
    bs, mask = config.block_size, config.mask_token_id
    start_time = time.perf_counter()
    prompts, prompt_len_host = _prompt_batch(input_ids, device, mask, pad, config.vocab_size)
    batch, max_prompt = prompts.shape
    width = max_prompt + max_new_tokens
    canvas_len = math.ceil(width / bs) * bs              # every block of every sequence fits
    canvas = torch.full((batch, canvas_len), pad, dtype=torch.int64, device=device)
    canvas[:, :max_prompt] = prompts
    prompt_len = prompt_len_host.to(device)
    gen_end = prompt_len + max_new_tokens
    offsets = torch.arange(bs, device=device)
    block_start = (prompt_len // bs) * bs                # int64 (batch,)

    cache = None
    if use_cache:
        cache = model.allocate_cache(batch, canvas_len)
        prefill_len = int((prompt_len_host // bs).max()) * bs
        if prefill_len > 0:
            model.hidden_states(canvas[:, :prefill_len], cache=cache, prefill=True, sidecar=sidecar)
        cache.seqlens.copy_(block_start.to(torch.int32))
    _sync(device)
    prefill_time = time.perf_counter() - start_time

    def initial_block(start):
        pos = start[:, None] + offsets
        fresh = torch.where(pos < gen_end[:, None], torch.full_like(pos, mask), torch.full_like(pos, pad))
        return torch.where(pos < prompt_len[:, None], canvas.gather(1, pos), fresh)

    block = initial_block(block_start)
    phase = torch.full((batch,), _DENOISE, dtype=torch.int64, device=device)
    steps = torch.zeros(batch, dtype=torch.int64, device=device)
    commit_block = _block_committer(ops, step_callback, canvas, steps, mask_token_id=mask, threshold=threshold,
                                    min_per_step=min_per_step, max_per_step=max_per_step, temperature=temperature,
                                    seed=seed, score=score)

    def block_logits():
        pos = block_start[:, None] + offsets
        # The padding past the budget stays out of parallel_commit's reach in `block`; the model reads [MASK].
        seen = torch.where(pos < gen_end[:, None], block, mask)
        if use_cache:
            return model.logits(model.hidden_states(seen, cache=cache, sidecar=sidecar))
        visible = int(block_start.max()) + bs            # host read: the cache-free path is a test path
        hidden = model.hidden_states(canvas[:, :visible].scatter(1, pos, seen), sidecar=sidecar)
        return model.logits(hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1])))

    def step():
        active = phase == _DENOISE
        clean = phase == _CLEAN
        logits = block_logits()
        n_masked = commit_block(logits, block, block_start, active)
        pos = block_start[:, None] + offsets
        canvas.scatter_(1, pos, block)
        completed = active & (n_masked == 0)
        finished = completed & (block_start + bs >= gen_end)
        if eos_token_id is not None:
            generated = (pos >= prompt_len[:, None]) & (pos < gen_end[:, None])
            finished |= completed & ((block == eos_token_id) & generated).any(-1)
        # The clean pass of a completed block just ran (this step's forward, on the finished tokens, wrote
        # their exact K/V): commit them to the cache and open the next block.
        block_start.add_(clean.long() * bs)
        if cache is not None:
            cache.seqlens.add_(clean.to(torch.int32) * bs)
        block.copy_(torch.where(clean[:, None], initial_block(block_start), block))
        phase.copy_(torch.where(clean, _DENOISE, torch.where(finished, _DONE, torch.where(completed, _CLEAN, phase))))

    max_blocks = math.ceil(max_new_tokens / bs) + 1
    forward_passes = _run_loop(step, lambda: not bool((phase != _DONE).any()), max_blocks * (bs + 1) + 1,
                               device, cuda_graph, "generate")
    sequences, lengths, num_generated = _finish(canvas, prompt_len, gen_end, eos_token_id, pad, width)
    _sync(device)
    stats = GenerationStats(prompt_lengths=prompt_len_host, num_generated=num_generated.cpu(), steps=steps.cpu(),
                            forward_passes=forward_passes, wall_time=time.perf_counter() - start_time,
                            prefill_time=prefill_time)
    return GenerationOutput(sequences=sequences, lengths=lengths, stats=stats)


# -- autoregressive baseline ------------------------------------------------------------------------------

@torch.inference_mode()
def autoregressive_generate(model: R2LMForCausalLM, input_ids: Prompts, *, max_new_tokens: int,
                            temperature: float = 0.0, seed: int = 0, eos_token_id: Optional[int] = None,
                            pad_token_id: Optional[int] = None, cuda_graph: bool = False,
                            step_callback: Optional[Callable[[StepInfo], None]] = None) -> GenerationOutput:
    """Autoregressive decoding of the same network (no sidecar, causal attention, next-token reading of the
    logits), one token a step with a KV cache. Tokens are chosen by parallel_commit on a one-position block
    (greedy, or Gumbel-max sampling at temperature > 0 with random numbers keyed by (seed, step, batch index),
    never the mask token). Stops at EOS or the budget."""
    pad, max_new_tokens, _ = _check_common(model, max_new_tokens, 1, pad_token_id, eos_token_id)
    _check_graph_args(model, cuda_graph, step_callback)
    config, ops, device = model.config, model.ops, model.device
    mask = config.mask_token_id
    start_time = time.perf_counter()
    prompts, prompt_len_host = _prompt_batch(input_ids, device, mask, pad, config.vocab_size)
    batch, max_prompt = prompts.shape
    width = max_prompt + max_new_tokens
    canvas = torch.full((batch, width), pad, dtype=torch.int64, device=device)
    canvas[:, :max_prompt] = prompts
    prompt_len = prompt_len_host.to(device)
    gen_end = prompt_len + max_new_tokens

    cache = model.allocate_cache(batch, width)
    hidden = model.hidden_states(prompts, cache=cache, prefill=True, sidecar=False)
    last = hidden.gather(1, (prompt_len - 1)[:, None, None].expand(-1, 1, hidden.shape[-1]))
    cache.seqlens.copy_(prompt_len.to(torch.int32))   # the cache holds the prompt; `token` sits at seqlens
    token = prompts.gather(1, (prompt_len - 1)[:, None])  # the last token the model ran on
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    failed = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = torch.zeros(batch, dtype=torch.int64, device=device)
    step_counter = torch.zeros(1, dtype=torch.int64, device=device)
    all_active = torch.ones(batch, dtype=torch.bool, device=device)
    callback_index = [0]

    def choose(logits, active):
        """Picks the next token into `token` for active rows; records it on the canvas."""
        if step_callback is not None:
            # A running row's token sits one before seqlens (just advanced), a finished row's at seqlens.
            step_callback(StepInfo(callback_index[0], token.clone(), cache.seqlens.long() - active.long(), logits,
                                   active.clone(), canvas))
            callback_index[0] += 1
        proposal = torch.full_like(token, mask)
        committed, _, _ = ops.parallel_commit(logits, proposal, mask_token_id=mask, threshold=float("-inf"),
                                              min_per_step=1, max_per_step=1, temperature=temperature, seed=seed,
                                              step=step_counter, active=active)
        failed.copy_(failed | (active & ~committed[:, 0]))  # non-finite logits: no token could be chosen
        token.copy_(torch.where(active[:, None], proposal, token))
        steps.add_(active.long())
        step_counter.add_(1)
        canvas.scatter_(1, cache.seqlens.long()[:, None], token)
        stop = steps + prompt_len >= gen_end
        if eos_token_id is not None:
            stop |= token[:, 0] == eos_token_id
        done.copy_(done | stop | failed)

    choose(model.logits(last), all_active)
    _sync(device)
    prefill_time = time.perf_counter() - start_time

    def step():
        active = ~done
        logits = model.logits(model.hidden_states(token, cache=cache, sidecar=False))  # writes token's K/V
        cache.seqlens.add_(active.to(torch.int32))
        choose(logits, active)

    forward_passes = _run_loop(step, lambda: bool(done.all()), max_new_tokens, device, cuda_graph,
                               "autoregressive_generate")
    if bool(failed.any()):
        raise RuntimeError(f"autoregressive_generate: no token could be chosen for sequence(s) "
                           f"{failed.nonzero().flatten().tolist()} (non-finite logits?)")
    sequences, lengths, num_generated = _finish(canvas, prompt_len, gen_end, eos_token_id, pad, width)
    _sync(device)
    stats = GenerationStats(prompt_lengths=prompt_len_host, num_generated=num_generated.cpu(), steps=steps.cpu(),
                            forward_passes=forward_passes + 1, wall_time=time.perf_counter() - start_time,
                            prefill_time=prefill_time)
    return GenerationOutput(sequences=sequences, lengths=lengths, stats=stats)


# -- bidirectional dLLM baseline --------------------------------------------------------------------------

@torch.inference_mode()
def bidirectional_generate(model: R2LMForCausalLM, input_ids: Prompts, *, max_new_tokens: int,
                           block_size: Optional[int] = None, threshold: float = 0.9, min_per_step: int = 1,
                           max_per_step: int = 0, temperature: float = 0.0, seed: int = 0,
                           eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                           score: str = "prob", cuda_graph: bool = False,
                           step_callback: Optional[Callable[[StepInfo], None]] = None) -> GenerationOutput:
    """A bidirectional dLLM (LLaDA-style semi-autoregressive blocks): every step runs the network with full
    bidirectional attention (no sidecar) over the whole canvas (prompt + generated + masks, no cache) and
    commits inside the current block of block_size (default config.block_size) positions, counted from
    the end of the prompt. Same commit rule (random numbers keyed by (seed, step, batch index, position))
    and stopping as `generate`; cuda_graph as there (every step has the same shapes)."""
    pad, max_new_tokens, min_per_step = _check_common(model, max_new_tokens, min_per_step, pad_token_id, eos_token_id)
    _check_graph_args(model, cuda_graph, step_callback)
    config, ops, device = model.config, model.ops, model.device
    bs = block_size if block_size is not None else config.block_size
    if not (_is_int(bs) and bs >= 1):
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    bs = int(bs)
    mask = config.mask_token_id
    start_time = time.perf_counter()
    prompts, prompt_len_host = _prompt_batch(input_ids, device, mask, pad, config.vocab_size)
    batch, max_prompt = prompts.shape
    width = max_prompt + max_new_tokens
    canvas = torch.full((batch, width + bs), pad, dtype=torch.int64, device=device)  # + bs: last block's slack
    canvas[:, :max_prompt] = prompts
    prompt_len = prompt_len_host.to(device)
    gen_end = prompt_len + max_new_tokens
    pos_all = torch.arange(canvas.shape[1], device=device)[None, :]
    canvas.copy_(torch.where((pos_all >= prompt_len[:, None]) & (pos_all < gen_end[:, None]), mask, canvas))
    # Right padding is hidden from bidirectional attention; equal lengths need no mask.
    lengths = gen_end if int(prompt_len_host.min()) != int(prompt_len_host.max()) else None
    block_start = prompt_len.clone()
    offsets = torch.arange(bs, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = torch.zeros(batch, dtype=torch.int64, device=device)
    commit_block = _block_committer(ops, step_callback, canvas, steps, mask_token_id=mask, threshold=threshold,
                                    min_per_step=min_per_step, max_per_step=max_per_step, temperature=temperature,
                                    seed=seed, score=score)

    def step():
        active = ~done
        hidden = model.hidden_states(canvas[:, :width], causal=False, sidecar=False, lengths=lengths)
        pos = block_start[:, None] + offsets
        in_range = pos < gen_end[:, None]
        block = torch.where(in_range, canvas.gather(1, pos), pad)
        logits = model.logits(hidden.gather(1, pos.clamp(max=width - 1)[..., None].expand(-1, -1, hidden.shape[-1])))
        n_masked = commit_block(logits, block, block_start, active)
        canvas.scatter_(1, pos, torch.where(in_range, block, canvas.gather(1, pos)))
        completed = active & (n_masked == 0)
        finished = completed & (block_start + bs >= gen_end)
        if eos_token_id is not None:
            finished |= completed & ((block == eos_token_id) & in_range).any(-1)
        block_start.add_((completed & ~finished).long() * bs)
        done.copy_(done | finished)

    max_blocks = math.ceil(max_new_tokens / bs)
    forward_passes = _run_loop(step, lambda: bool(done.all()), max_blocks * bs + 1, device, cuda_graph,
                               "bidirectional_generate")
    sequences, lengths_out, num_generated = _finish(canvas[:, :width], prompt_len, gen_end, eos_token_id, pad, width)
    _sync(device)
    stats = GenerationStats(prompt_lengths=prompt_len_host, num_generated=num_generated.cpu(), steps=steps.cpu(),
                            forward_passes=forward_passes, wall_time=time.perf_counter() - start_time)
    return GenerationOutput(sequences=sequences, lengths=lengths_out, stats=stats)
