"""parallel_commit (DESIGN.md 3.4): wrapper and fake implementation."""
from __future__ import annotations

import torch

from .. import _ext  # noqa: F401  (registers torch.ops.r2lm)


def parallel_commit(logits, tokens, *, mask_token_id, threshold, min_per_step=1, max_per_step=0,
                    temperature=0.0, seed=0, step=0, active=None, score="prob"):
    """Commit confident masked positions of each sequence's block; `tokens` is updated in place.
    `step` is an int or a one-element int64 tensor on the logits' device (fresh random numbers per
    replay of a captured CUDA graph). temperature is 0 (greedy) or at least 1e-6 (the picks are
    logits / temperature in fp32). Returns (committed bool, confidence fp32, n_masked int32).

    Non-finite logits: a position whose logits row holds a NaN or +inf (the mask token's logit
    included), or whose non-mask logits are all -inf, is never committed and gets confidence -inf;
    -inf logits elsewhere are ordinary (probability 0). The mask token is never a candidate.

    There is no backward (commits are discrete choices): logits that require grad, with grad mode on,
    raise instead of leaving confidence's gradient silently missing."""
    if torch.is_grad_enabled() and logits.requires_grad:
        raise RuntimeError("parallel_commit has no backward: logits requires grad; call it under torch.no_grad() "
                           "or torch.inference_mode(), or pass logits.detach()")
    step_tensor = step if isinstance(step, torch.Tensor) else None
    step_int = 0 if step_tensor is not None else int(step)
    return torch.ops.r2lm.parallel_commit(logits, tokens, mask_token_id=mask_token_id, threshold=float(threshold),
                                          min_per_step=min_per_step, max_per_step=max_per_step,
                                          temperature=float(temperature), seed=seed, step=step_int,
                                          step_tensor=step_tensor, active=active, score=score)


@torch.library.register_fake("r2lm::parallel_commit")
def _(logits, tokens, *, mask_token_id, threshold, min_per_step=1, max_per_step=0, temperature=0.0, seed=0,
      step=0, step_tensor=None, active=None, score="prob"):
    batch, block, _ = logits.shape
    return (logits.new_empty((batch, block), dtype=torch.bool),
            logits.new_empty((batch, block), dtype=torch.float32),
            logits.new_empty((batch,), dtype=torch.int32))
