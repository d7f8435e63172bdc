"""r2lm_kernels: C++/CUDA kernels for R2LM (Right-to-Left Mamba) block-diffusion language models.

Ops (torch.ops.r2lm.*, wrapped here with fake implementations and autograd):
  reverse_selective_scan, reverse_conv1d, cache_attention, parallel_commit.
Plain-PyTorch references of the same ops live in r2lm_kernels.reference.
"""
from ._ext import compiled_backends, cpu_vector_bytes, registered_ops
from .ops.cache_attention import cache_attention
from .ops.parallel_commit import parallel_commit
from .ops.reverse_conv1d import reverse_conv1d
from .ops.reverse_selective_scan import reverse_selective_scan
from . import reference

__version__ = "0.1.0"

__all__ = [
    "reverse_selective_scan",
    "reverse_conv1d",
    "cache_attention",
    "parallel_commit",
    "compiled_backends",
    "cpu_vector_bytes",
    "registered_ops",
    "reference",
]

# The model, generation and baselines assembled from the ops.
from .config import R2LMConfig
from .model import KVCache, R2LMForCausalLM
from .generate import (GenerationOutput, GenerationStats, StepInfo, autoregressive_generate,
                       bidirectional_generate, generate)

__all__ += ["R2LMConfig", "R2LMForCausalLM", "KVCache", "generate", "autoregressive_generate",
            "bidirectional_generate", "GenerationOutput", "GenerationStats", "StepInfo"]
