"""The R2LM model: a Qwen3-style decoder with a right-to-left Mamba sidecar beside attention (DESIGN.md 2).

Module names follow Hugging Face's Qwen3 (`model.layers.N.self_attn.q_proj`, ...), so a Qwen3 state dict
loads as is; the sidecar lives at `model.layers.N.sidecar`.

Three ways to run the network, all under the same segment rules (position p is in block p // block_size;
the sidecar never crosses a block boundary; attention is causal unless asked otherwise):
  * full sequence from position 0 (training, prefill, cache-free recompute): SDPA attention;
  * prefill: the same, also writing every position's K/V into a KVCache;
  * block: a block of tokens starting at `cache.seqlens[b]` for sequence b, attending to the cache and to
    itself through `cache_attention`, which also writes the block's K/V (the cache length is not advanced).

`impl="kernels"` runs the r2lm ops (`r2lm_kernels.<op>`), `impl="reference"` their plain-PyTorch
references (`r2lm_kernels.reference.<op>`); there is no fallback from one to the other.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import reference as _reference
from .config import R2LMConfig
from .ops.cache_attention import cache_attention as _cache_attention
from .ops.parallel_commit import parallel_commit as _parallel_commit
from .ops.reverse_conv1d import reverse_conv1d as _reverse_conv1d
from .ops.reverse_selective_scan import reverse_selective_scan as _reverse_selective_scan

__all__ = ["R2LMForCausalLM", "KVCache", "ReverseMambaSidecar", "get_ops", "IMPLS"]

IMPLS = ("kernels", "reference")

_KERNEL_OPS = SimpleNamespace(reverse_selective_scan=_reverse_selective_scan, reverse_conv1d=_reverse_conv1d,
                              cache_attention=_cache_attention, parallel_commit=_parallel_commit)
_REFERENCE_OPS = SimpleNamespace(reverse_selective_scan=_reference.reverse_selective_scan,
                                 reverse_conv1d=_reference.reverse_conv1d,
                                 cache_attention=_reference.cache_attention,
                                 parallel_commit=_reference.parallel_commit)


def get_ops(impl: str) -> SimpleNamespace:
    """The four ops of `impl`: "kernels" (compiled r2lm ops) or "reference" (plain PyTorch)."""
    if impl == "kernels":
        return _KERNEL_OPS
    if impl == "reference":
        return _REFERENCE_OPS
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


@dataclass
class KVCache:
    """Contiguous K/V, one tensor per layer: k[layer], v[layer] (batch, max_len, n_kv_heads, head_dim);
    seqlens (batch,) int32 = committed length of each sequence. Positions at and past seqlens[b] hold
    scratch. Separate tensors, not views of one: torch.compile (inductor, dynamic shapes) drops the storage
    offset of a view that an op writes in place, and would store every layer's K/V in the first layer's."""

    k: Tuple[torch.Tensor, ...]
    v: Tuple[torch.Tensor, ...]
    seqlens: torch.Tensor

    @classmethod
    def allocate(cls, config: R2LMConfig, batch: int, max_len: int, *, dtype, device) -> "KVCache":
        shape = (batch, max_len, config.num_key_value_heads, config.head_dim)

        def layers():
            return tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers))
        return cls(k=layers(), v=layers(), seqlens=torch.zeros(batch, dtype=torch.int32, device=device))

    @property
    def batch(self) -> int:
        return self.seqlens.shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]


# A pytree node, so that torch.export takes a KVCache argument (a block step exported with its cache), and allowed
# in a weights-only torch.load (torch.export.save stores the example inputs with the program).
torch.export.register_dataclass(KVCache, serialized_type_name="r2lm_kernels.KVCache")
torch.serialization.add_safe_globals([KVCache])


class RMSNorm(nn.Module):
    """Qwen3's RMSNorm: normalise in fp32 (fp64 stays fp64), cast back, then scale."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        h = x if x.dtype == torch.float64 else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _random(like: torch.Tensor, generator, uniform: bool = False) -> torch.Tensor:
    """N(0, 1) (or U[0, 1)) values shaped like `like`, drawn on the generator's device (else like's)."""
    device = generator.device if generator is not None else like.device
    draw = torch.rand if uniform else torch.randn
    return draw(like.shape, generator=generator, device=device).to(like.device)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@dataclass
class _Pass:
    """What one forward pass shares across layers."""
    cos: torch.Tensor                  # (batch or 1, seqlen, 1, head_dim), compute dtype
    sin: torch.Tensor
    seq_idx: Optional[torch.Tensor]    # (batch, seqlen) int32 segment ids; None when no sidecar runs
    causal: bool
    key_mask: Optional[torch.Tensor]   # (batch, 1, 1, seqlen) bool keys to attend (full mode only)
    cache: Optional[KVCache]
    block_mode: bool                   # True: block at cache.seqlens via cache_attention
    ops: SimpleNamespace


class Attention(nn.Module):
    """GQA attention with per-head q/k RMSNorm and RoPE (Qwen3)."""

    def __init__(self, config: R2LMConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def forward(self, x, p: _Pass, layer: int):
        batch, seqlen, _ = x.shape
        q = _rotate(self.q_norm(self.q_proj(x).view(batch, seqlen, self.n_heads, self.head_dim)), p.cos, p.sin)
        k = _rotate(self.k_norm(self.k_proj(x).view(batch, seqlen, self.n_kv, self.head_dim)), p.cos, p.sin)
        v = self.v_proj(x).view(batch, seqlen, self.n_kv, self.head_dim)
        if p.block_mode:
            # The op takes the cache's dtype; under autocast q and k leave their norms in fp32, v in the
            # autocast's. The output goes back to v's dtype, for o_proj.
            dtype = v.dtype
            q, k, v = (t.to(p.cache.k[layer].dtype) for t in (q, k, v))
            out = p.ops.cache_attention(q, k, v, p.cache.k[layer], p.cache.v[layer], p.cache.seqlens,
                                        causal=p.causal, write_kv=True).to(dtype)
        else:
            if p.cache is not None:  # prefill; detached: a cache written under grad mode would hold this graph
                p.cache.k[layer][:, :seqlen] = k.detach()
                p.cache.v[layer][:, :seqlen] = v.detach()
            gqa = self.n_kv != self.n_heads
            if gqa and p.key_mask is not None:
                # The fused SDPA kernel that takes a mask has no GQA: give it one K/V head per query head.
                k, v = (t.repeat_interleave(self.n_heads // self.n_kv, dim=2) for t in (k, v))
                gqa = False
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=p.key_mask, is_causal=p.causal and p.key_mask is None,
                                                 enable_gqa=gqa).transpose(1, 2)
        return self.o_proj(out.reshape(batch, seqlen, self.n_heads * self.head_dim))


# Parameters that R2LMForCausalLM.cast keeps in fp32 under a 16-bit dtype.
_FP32_SIDECAR_PARAMETERS = (".sidecar.A_log", ".sidecar.D", ".sidecar.dt_proj.bias")


class ReverseMambaSidecar(nn.Module):
    """Mamba-1 mixer run right to left inside each block (DESIGN.md 2). out_proj starts at zero, so a
    fresh sidecar leaves the base model unchanged."""

    def __init__(self, config: R2LMConfig):
        super().__init__()
        c = config
        self.d_inner, self.d_state, self.dt_rank = c.sidecar_d_inner, c.sidecar_d_state, c.sidecar_dt_rank
        self.in_proj = nn.Linear(c.hidden_size, 2 * self.d_inner, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.d_inner, c.sidecar_d_conv))
        self.conv_bias = nn.Parameter(torch.empty(self.d_inner))
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, c.hidden_size, bias=False)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float, generator=None):
        """Mamba's initialisation: S4D-real A, D = 1, dt log-uniform in [1e-3, 1e-1] through the dt bias."""
        def symmetric(t, bound):
            return (_random(t, generator, uniform=True) * 2 - 1) * bound

        self.in_proj.weight.copy_(_random(self.in_proj.weight, generator) * std)
        self.x_proj.weight.copy_(_random(self.x_proj.weight, generator) * std)
        self.out_proj.weight.copy_(_random(self.out_proj.weight, generator) * out_std)
        bound = self.conv_weight.shape[1] ** -0.5
        self.conv_weight.copy_(symmetric(self.conv_weight, bound))
        self.conv_bias.copy_(symmetric(self.conv_bias, bound))
        self.dt_proj.weight.copy_(symmetric(self.dt_proj.weight, self.dt_rank ** -0.5))
        log_lo, log_hi = math.log(1e-3), math.log(1e-1)
        dt = torch.exp(_random(self.dt_proj.bias, generator, uniform=True).float() * (log_hi - log_lo)
                       + log_lo).clamp(min=1e-4)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device))
                         .expand(self.d_inner, -1))
        self.D.fill_(1.0)

    def forward(self, a, seq_idx, ops):
        x, z = self.in_proj(a).chunk(2, dim=-1)
        x = ops.reverse_conv1d(x, self.conv_weight, self.conv_bias, seq_idx=seq_idx, silu=True)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight)
        # The scan keeps its state in fp32 (fp64 for fp64 inputs) and takes A, D, delta_bias in that type.
        state_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
        y = ops.reverse_selective_scan(x, delta, -torch.exp(self.A_log.to(state_dtype)), B, C,
                                       D=self.D.to(state_dtype), z=z, delta_bias=self.dt_proj.bias.to(state_dtype),
                                       delta_softplus=True, seq_idx=seq_idx)
        return self.out_proj(y)


class MLP(nn.Module):
    def __init__(self, config: R2LMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """x = x + attention(a) + sidecar(a), a = input_layernorm(x); x = x + mlp(post_attention_layernorm(x))."""

    def __init__(self, config: R2LMConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.sidecar = ReverseMambaSidecar(config) if config.has_sidecar(layer) else None
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, p: _Pass):
        a = self.input_layernorm(x)
        x = x + self.self_attn(a, p, self.layer)
        if self.sidecar is not None and p.seq_idx is not None:
            x = x + self.sidecar(a, p.seq_idx, p.ops)
        return x + self.mlp(self.post_attention_layernorm(x))


class R2LMModel(nn.Module):
    def __init__(self, config: R2LMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class R2LMForCausalLM(nn.Module):
    """R2LM language model. `model(input_ids)` returns the logits of the whole sequence (batch, seqlen, vocab)
    under the segment rules; with the masked-diffusion parameterisation (no shift) the logits at a masked
    position predict that position's token. See the module docstring for the three running modes."""

    def __init__(self, config: R2LMConfig, *, impl: str = "kernels", device=None, dtype=None):
        """A randomly initialised model (see init_weights), built directly on `device` (e.g. "cuda": no
        host copy of a large model) and then cast to `dtype` (see cast)."""
        super().__init__()
        self.config = config
        self.impl = impl
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.model = R2LMModel(config)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rope_inv_freq = self._rope_inverse_frequencies()
        self.init_weights()
        if dtype is not None:
            self.cast(dtype)

    # -- construction -------------------------------------------------------------------------------

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str):
        get_ops(value)  # validates
        self._impl = value

    @property
    def ops(self) -> SimpleNamespace:
        return get_ops(self._impl)

    def cast(self, dtype: torch.dtype) -> "R2LMForCausalLM":
        """`self.to(dtype)`, except that a 16-bit dtype leaves the sidecars' A_log, D and dt_proj.bias in
        fp32, as Mamba does: the scan takes them in fp32, and rounded to 8 bits they would move every decay
        rate and step size by up to a few percent. The constructor, load and from_qwen3 cast this way; a plain
        `.to(dtype)` casts every parameter. (Wrappers that flatten a module's parameters into one dtype need
        the plain `.to`.)"""
        keep = dtype in (torch.float16, torch.bfloat16)
        kept = {name: param.data.float() for name, param in self.named_parameters()
                if keep and name.endswith(_FP32_SIDECAR_PARAMETERS)}
        self.to(dtype=dtype)
        for name, data in kept.items():
            param = self.get_parameter(name)
            param.data = data
            if param.grad is not None:  # an optimizer step needs the gradient in the parameter's dtype
                param.grad = param.grad.float()
        return self

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, sidecar_out_std: float = 0.0, generator=None):
        """Random init: weights ~ N(0, std), norms 1, biases 0, Mamba's init for the sidecar, whose
        out_proj ~ N(0, sidecar_out_std) (0: the sidecar starts as a no-op, DESIGN.md 2)."""
        for name, param in self.named_parameters():
            if ".sidecar." in name:
                continue
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.copy_(_random(param, generator) * std)
        for layer in self.model.layers:
            if layer.sidecar is not None:
                layer.sidecar.init_weights(std, sidecar_out_std, generator)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def allocate_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.allocate(self.config, batch, max_len, dtype=self.dtype, device=self.device)

    # -- running ------------------------------------------------------------------------------------

    def _rope_inverse_frequencies(self):
        """RoPE's inverse frequencies in fp32, computed on the CPU as Qwen3 does, on the model's device. A plain
        attribute, not a buffer, so that a dtype cast leaves it fp32; _apply moves it with the model, and _rope
        redoes it for a model built on meta and given its weights by assignment. (Looked up per device on the
        first call, it made a compiled model recompile on its second call.)"""
        d = self.config.head_dim
        inv = 1.0 / (self.config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        return inv.to(self.device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._rope_inv_freq = self._rope_inverse_frequencies()
        return self

    def _rope(self, positions, dtype):
        """cos, sin of shape (batch or 1, seqlen, 1, head_dim), computed in fp32 as Qwen3 does."""
        if self._rope_inv_freq.device != positions.device:  # built on meta, then given weights by assignment
            self._rope_inv_freq = self._rope_inverse_frequencies()
        freqs = positions[..., None].float() * self._rope_inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[..., None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def hidden_states(self, input_ids, *, cache: Optional[KVCache] = None, prefill: bool = False,
                      causal: bool = True, sidecar: bool = True, lengths=None):
        """Final-norm hidden states (batch, seqlen, hidden_size).

        cache=None: the sequence from position 0. With a cache and prefill=True: the same, also writing each
        position's K/V at cache positions [0, seqlen). With a cache and prefill=False: `input_ids` is a block
        whose first token sits at position cache.seqlens[b]; its K/V are written there (seqlens unchanged).
        With the sidecar, a prefill covers whole blocks (seqlen a multiple of block_size) and a block starts at
        a block boundary: the sidecar of a block reads the block's right end, so the K/V of a partial block
        would not be the ones the finished block has.
        causal=False attends bidirectionally (inside the block in block mode). sidecar=False skips the
        sidecar. lengths (batch,), full mode only: positions >= lengths[b] are right padding, hidden from the
        others: masked as keys (under bidirectional attention; causal attention needs no mask) and a segment
        of their own for the right-to-left sidecar.
        """
        if not (isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and not input_ids.is_floating_point()):
            raise ValueError(f"input_ids must be an integer tensor (batch, seqlen), got "
                             f"{getattr(input_ids, 'shape', type(input_ids))}")
        batch, seqlen = input_ids.shape
        if seqlen == 0:
            raise ValueError("input_ids must hold at least one position")
        block_mode = cache is not None and not prefill
        if cache is not None:
            if cache.batch != batch:
                raise ValueError(f"cache holds {cache.batch} sequences, input_ids {batch}")
            if prefill and seqlen > cache.max_len:
                raise ValueError(f"prefill of {seqlen} positions exceeds the cache's max_len {cache.max_len}")
            c = self.config
            layer_shape = (c.num_key_value_heads, c.head_dim)
            if not (len(cache.k) == len(cache.v) == c.num_hidden_layers
                    and all(t.shape[2:] == layer_shape for t in cache.k + cache.v)):
                raise ValueError(f"cache must hold {c.num_hidden_layers} layers of K and V with (n_kv_heads, head_dim) "
                                 f"= {layer_shape}, got {len(cache.k)} / {len(cache.v)} layers of "
                                 f"{[tuple(t.shape[2:]) for t in cache.k[:1]]} (allocate it with allocate_cache)")
        if lengths is not None and block_mode:
            raise ValueError("lengths applies to full-sequence mode only")
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=input_ids.device)
            if lengths.shape != (batch,) or lengths.is_floating_point() or lengths.dtype == torch.bool:
                raise ValueError(f"lengths must hold one integer per sequence, shape ({batch},), got shape "
                                 f"{tuple(lengths.shape)} dtype {lengths.dtype}")
        device = input_ids.device
        offsets = torch.arange(seqlen, device=device)
        positions = cache.seqlens.long()[:, None] + offsets if block_mode else offsets[None, :]
        x = self.model.embed_tokens(input_ids)
        cos, sin = self._rope(positions, x.dtype)
        run_sidecar = sidecar and any(layer.sidecar is not None for layer in self.model.layers)
        if run_sidecar and cache is not None and prefill and seqlen % self.config.block_size:
            raise ValueError(f"a prefill with the sidecar must cover whole blocks: seqlen {seqlen} is not a multiple "
                             f"of block_size {self.config.block_size} (prefill the whole blocks, then run the rest "
                             f"as a block; or pass sidecar=False)")
        valid = None if lengths is None else offsets[None, :] < lengths[:, None]
        seq_idx = None
        if run_sidecar:
            seq_idx = (positions // self.config.block_size).expand(batch, seqlen)
            if valid is not None:  # padding: a segment index past every block's, so no real position sees it
                seq_idx = torch.where(valid, seq_idx, (seqlen - 1) // self.config.block_size + 1)
            seq_idx = seq_idx.to(torch.int32).contiguous()
        # Right padding is never a key of a real position under causal attention: no mask then.
        key_mask = valid[:, None, None, :] if valid is not None and not causal else None
        p = _Pass(cos=cos, sin=sin, seq_idx=seq_idx, causal=causal, key_mask=key_mask, cache=cache,
                  block_mode=block_mode, ops=self.ops)
        for layer in self.model.layers:
            x = layer(x, p)
        return self.model.norm(x)

    def logits(self, hidden):
        return self.lm_head(hidden)

    def forward(self, input_ids, *, causal: bool = True, sidecar: bool = True, lengths=None):
        """Logits (batch, seqlen, vocab) of the whole sequence from position 0 (see hidden_states)."""
        return self.logits(self.hidden_states(input_ids, causal=causal, sidecar=sidecar, lengths=lengths))

    # -- conversion, save, load ---------------------------------------------------------------------

    @classmethod
    def from_qwen3(cls, hf_model, *, mask_token_id: Optional[int] = None, block_size: int = 32,
                   sidecar_layers=None, sidecar_d_inner=None, sidecar_d_state: int = 16, sidecar_d_conv: int = 4,
                   sidecar_dt_rank=None, impl: str = "kernels", generator=None) -> "R2LMForCausalLM":
        """An R2LM model from a `transformers` Qwen3ForCausalLM: its embeddings, attention, norms and MLP
        weights, plus freshly initialised sidecars with a zero out_proj (the result computes the Qwen3
        model's logits exactly until the sidecars are trained). The new model has the HF model's dtype (see
        cast) and device. mask_token_id=None takes the last vocabulary id. Refused (ValueError): RoPE other than
        the default, sliding-window layers, attention dropout, an activation other than SiLU. The embedding has
        no padding_idx: the pad token's row is trained like the others."""
        hc = hf_model.config
        rope = dict(getattr(hc, "rope_parameters", None) or getattr(hc, "rope_scaling", None) or {})
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"from_qwen3: only default RoPE is supported, got rope parameters {rope}")
        # Releases of transformers without layer_types apply the window to every layer.
        sliding = ("sliding_attention" in hc.layer_types if getattr(hc, "layer_types", None) is not None else
                   bool(getattr(hc, "use_sliding_window", False)) and getattr(hc, "sliding_window", None) is not None)
        if sliding:
            raise ValueError("from_qwen3: sliding-window attention layers are not supported")
        if getattr(hc, "attention_dropout", 0.0):
            raise ValueError(f"from_qwen3: attention_dropout must be 0 (R2LM's attention has no dropout), got "
                             f"{hc.attention_dropout}")
        if getattr(hc, "hidden_act", "silu") not in ("silu", "swish"):  # transformers' two names for SiLU
            raise ValueError(f"from_qwen3: hidden_act must be 'silu' (or 'swish'), got {hc.hidden_act!r}")
        rope_theta = rope.get("rope_theta", getattr(hc, "rope_theta", None))
        head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads
        config = R2LMConfig(
            vocab_size=hc.vocab_size, hidden_size=hc.hidden_size, intermediate_size=hc.intermediate_size,
            num_hidden_layers=hc.num_hidden_layers, num_attention_heads=hc.num_attention_heads,
            num_key_value_heads=hc.num_key_value_heads, head_dim=head_dim, rms_norm_eps=hc.rms_norm_eps,
            rope_theta=float(rope_theta), max_position_embeddings=hc.max_position_embeddings,
            attention_bias=bool(hc.attention_bias), tie_word_embeddings=bool(hc.tie_word_embeddings),
            mask_token_id=mask_token_id, block_size=block_size, sidecar_layers=sidecar_layers,
            sidecar_d_inner=sidecar_d_inner, sidecar_d_state=sidecar_d_state, sidecar_d_conv=sidecar_d_conv,
            sidecar_dt_rank=sidecar_dt_rank)
        weight = hf_model.get_input_embeddings().weight
        model = cls(config, impl=impl, device=weight.device)
        if generator is not None:
            model.init_weights(generator=generator)
        source = {k: v for k, v in hf_model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
        if config.tie_word_embeddings:
            source.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(source, strict=False)
        not_sidecar = [k for k in missing if ".sidecar." not in k and not (k == "lm_head.weight"
                                                                          and config.tie_word_embeddings)]
        if not_sidecar or unexpected:
            raise ValueError(f"from_qwen3: weights did not map; missing {not_sidecar}, unexpected {unexpected}")
        return model.cast(weight.dtype)

    def save(self, path) -> None:
        """Writes the weights and the config into one safetensors file."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        save_file(state, str(path), metadata={"r2lm_config": json.dumps(self.config.to_dict())})

    @classmethod
    def load(cls, path, *, impl: str = "kernels", device=None, dtype=None) -> "R2LMForCausalLM":
        """Reads a file written by save(); the weights keep their saved dtype unless `dtype` is given (see
        cast)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if "r2lm_config" not in metadata:
            raise ValueError(f"{path}: not an R2LM checkpoint (no r2lm_config metadata)")
        config = R2LMConfig.from_dict(json.loads(metadata["r2lm_config"]))
        state = load_file(str(path), device=str(torch.device(device if device is not None else "cpu")))
        # Built without storage, then given the file's tensors: each keeps its own dtype (a bf16 model with
        # fp32 A_log / D stays so), and no random init is paid for.
        model = cls(config, impl=impl, device="meta")
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"{path}: checkpoint does not match its config; missing {missing}, "
                             f"unexpected {unexpected}")
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model._rope_inv_freq = model._rope_inverse_frequencies()  # assigning parameters moved nothing else
        return model if dtype is None else model.cast(dtype)
