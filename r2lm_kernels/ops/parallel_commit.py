"""parallel_commit (DESIGN.md 3.4): wrapper and fake implementation."""
from __future__ import annotations

import operator

import torch

from .. import _ext  # noqa: F401  (registers torch.ops.r2lm)
from . import check_same_device


def parallel_commit(logits, tokens, *, mask_token_id, threshold, min_per_step=1, max_per_step=0,
                    temperature=0.0, seed=0, step=0, active=None, score="prob"):
    """Commit confident masked positions of each sequence's block; `tokens` is updated in place (under
    torch.compile with inductor, pass it in as it is: once the shapes are dynamic, a slice of a larger buffer
    taken inside the compiled function is written at the buffer's start, PyTorch's bug: see the README).
    logits: (batch, block, vocab) float32 / bfloat16 / float16 / float64, unit stride in the last dim,
    block <= 1024; tokens: (batch, block) int64, a position is masked where it holds mask_token_id;
    active: (batch,) bool, the sequences that may commit (default all). Selection per sequence: the
    masked positions whose confidence is >= threshold, at least min_per_step of them (the most confident;
    ties to the lower position) and at most max_per_step (0: no limit). With p = softmax(logits), the
    candidate is the argmax of the non-mask logits (greedy) or a Gumbel-max sample of logits / temperature,
    and score is its confidence: "prob" p[candidate], "margin" the gap between the two largest non-mask
    p (+inf where the vocabulary holds one non-mask token), "neg_entropy" sum(p log p). The threshold is
    compared exactly with the fp32 confidence (not rounded to fp32 first).

    `step` is an int or a one-element int64 tensor on the logits' device (fresh random numbers per
    replay of a captured CUDA graph; under torch.compile too, where an int is a constant of the compiled
    graph and each new value compiles again); seed and step key the random numbers with all their 64
    bits (any integer in [-2**63, 2**64): a negative one means the same bits as its value + 2**64).
    temperature is 0 (greedy) or at least 1e-6 (the picks are logits / temperature in fp32). Returns
    committed (batch, block) bool, confidence (batch, block) fp32 (-inf where a position was not
    eligible) and n_masked (batch,) int32, the masked positions left. torch.ops.r2lm.parallel_commit is
    the registered op: seed and step as the int64 with the same bits, a step tensor as step_tensor.

    Non-finite logits: a position whose logits row holds a NaN or +inf (the mask token's logit
    included), or whose non-mask logits are all -inf, is never committed and gets confidence -inf;
    -inf logits elsewhere are ordinary (probability 0). The mask token is never a candidate.

    There is no backward (commits are discrete choices): logits that require grad, with grad mode on,
    raise (here and through torch.ops.r2lm.parallel_commit) instead of leaving confidence's gradient
    silently missing, and so do logits carrying a forward-mode tangent."""
    step_tensor = step if isinstance(step, torch.Tensor) else None
    if step_tensor is not None and (step_tensor.dtype != torch.int64 or step_tensor.numel() != 1):
        raise ValueError(f"parallel_commit: step must be an int or a one-element int64 tensor, got a tensor of "
                         f"shape {list(step_tensor.shape)} and dtype {step_tensor.dtype}")
    return torch.ops.r2lm.parallel_commit(
        logits, tokens, mask_token_id=_int64(mask_token_id, "mask_token_id"),
        threshold=_number(threshold, "threshold"), min_per_step=_int64(min_per_step, "min_per_step"),
        max_per_step=_int64(max_per_step, "max_per_step"), temperature=_number(temperature, "temperature"),
        seed=_uint64_bits(seed, "seed"), step=0 if step_tensor is not None else _uint64_bits(step, "step"),
        step_tensor=step_tensor, active=active, score=score)


def _number(value, name) -> float:
    if isinstance(value, (bool, str)) or value is None:
        raise TypeError(f"parallel_commit: {name} must be a number, got {value!r}")
    return float(value)


def _int(value, name) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"parallel_commit: {name} must be an int, got {value!r}") from None


def _int64(value, name) -> int:
    value = _int(value, name)
    if not -2**63 <= value < 2**63:
        raise ValueError(f"parallel_commit: {name} must be in [-2**63, 2**63), got {value}")
    return value


def _uint64_bits(value, name) -> int:
    """seed / step: any integer in [-2**63, 2**64), passed on as the int64 with the same 64 bits (the kernels
    and the reference read them as uint64)."""
    value = _int(value, name)
    if not -2**63 <= value < 2**64:
        raise ValueError(f"parallel_commit: {name} must be in [-2**63, 2**64), got {value}")
    return value - 2**64 if value >= 2**63 else value


@torch.library.register_fake("r2lm::parallel_commit")
def _(logits, tokens, *, mask_token_id, threshold, min_per_step=1, max_per_step=0, temperature=0.0, seed=0,
      step=0, step_tensor=None, active=None, score="prob"):
    check_same_device("parallel_commit", logits, tokens=tokens, step_tensor=step_tensor, active=active)
    # The rank is the one thing the shapes below need; the real kernel checks the rest (same message).
    torch._check(logits.dim() == 3,
                 lambda: f"parallel_commit: logits must have shape (batch, block, vocab), got {list(logits.shape)}")
    batch, block, _ = logits.shape
    return (logits.new_empty((batch, block), dtype=torch.bool),
            logits.new_empty((batch, block), dtype=torch.float32),
            logits.new_empty((batch,), dtype=torch.int32))
