"""R2LMConfig: the shape of an R2LM model (a Qwen3-style decoder plus a reverse-Mamba sidecar)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

__all__ = ["R2LMConfig"]


def _is_python_int(value) -> bool:
    """A Python int, not a bool (the fields are stored as given and saved to JSON)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class R2LMConfig:
    """Qwen3 decoder fields (names as in `transformers.Qwen3Config`), the diffusion fields and the sidecar.

    The defaults are the Qwen3-1.7B shape. `mask_token_id=None` means the last vocabulary id.
    `sidecar_layers=None` puts the sidecar in every layer; a list names the layers that get one
    (an empty list gives the plain base model). `None` sidecar sizes take DESIGN.md's defaults:
    d_inner = hidden_size // 2, dt_rank = ceil(hidden_size / 16).
    """

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    # Diffusion: the [MASK] token and the block (= sidecar segment) size.
    mask_token_id: Optional[int] = None
    block_size: int = 32
    # Reverse-Mamba sidecar.
    sidecar_layers: Optional[list] = None
    sidecar_d_inner: Optional[int] = None
    sidecar_d_state: int = 16
    sidecar_d_conv: int = 4
    sidecar_dt_rank: Optional[int] = None

    def __post_init__(self):
        # The fields the defaults derive from are checked first, so that a bad one is named.
        self._need(_is_python_int(self.vocab_size) and self.vocab_size >= 1, "vocab_size", "a positive int")
        self._need(_is_python_int(self.hidden_size) and self.hidden_size >= 1, "hidden_size", "a positive int")
        if self.mask_token_id is None:
            self.mask_token_id = self.vocab_size - 1
        if self.sidecar_d_inner is None:
            self.sidecar_d_inner = self.hidden_size // 2
        if self.sidecar_dt_rank is None:
            self.sidecar_dt_rank = math.ceil(self.hidden_size / 16)
        if self.sidecar_layers is not None:
            layers = self.sidecar_layers
            listed = isinstance(layers, (list, tuple, set, frozenset, range))
            self._need(listed and all(_is_python_int(i) for i in layers), "sidecar_layers",
                       "None or a list of layer indices (ints)")
            self.sidecar_layers = sorted({int(i) for i in layers})
        self.validate()

    def _need(self, ok, field, expected):
        if not ok:
            raise ValueError(f"R2LMConfig.{field} must be {expected}, got {getattr(self, field)!r}")

    def validate(self):
        need = self._need
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "block_size", "sidecar_d_inner", "sidecar_d_state",
                      "sidecar_d_conv", "sidecar_dt_rank"):
            need(_is_python_int(getattr(self, field)) and getattr(self, field) >= 1, field, "a positive int")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"a divisor of num_attention_heads={self.num_attention_heads}")
        need(self.head_dim % 2 == 0, "head_dim", "even (RoPE rotates pairs)")
        need(_is_python_int(self.mask_token_id) and 0 <= self.mask_token_id < self.vocab_size, "mask_token_id",
             f"an int in [0, vocab_size={self.vocab_size})")
        for field in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, field)
            need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                 and value > 0, field, "a positive finite number")
        need(_is_python_int(self.max_position_embeddings) and self.max_position_embeddings >= 1,
             "max_position_embeddings", "a positive int")
        for field in ("attention_bias", "tie_word_embeddings"):
            need(isinstance(getattr(self, field), bool), field, "a bool")
        if self.sidecar_layers is not None:
            need(all(0 <= i < self.num_hidden_layers for i in self.sidecar_layers), "sidecar_layers",
                 f"layer indices in [0, num_hidden_layers={self.num_hidden_layers})")

    def has_sidecar(self, layer: int) -> bool:
        return self.sidecar_layers is None or layer in self.sidecar_layers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "R2LMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"R2LMConfig.from_dict: unknown fields {unknown}")
        return cls(**d)

    @classmethod
    def qwen3_1_7b(cls, **overrides) -> "R2LMConfig":
        """The Qwen3-1.7B shape (the defaults), with overrides."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "R2LMConfig":
        """A few-layer shape for tests and examples (head_dim 64: a size the attention kernels support)."""
        fields = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                      tie_word_embeddings=False, block_size=8)
        fields.update(overrides)
        return cls(**fields)
