"""GPT-2 model configuration and named presets."""

from __future__ import annotations

import dataclasses
from typing import Literal

DType = Literal["float32", "bfloat16", "float16"]
Attention = Literal["xla", "cudnn", "tiled"]  # GPTConfig.attention
ATTENTIONS = ("xla", "cudnn", "tiled")
AttentionFlag = Literal["auto", "xla", "cudnn", "tiled"]  # --attention of train, generate and evaluate


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Shapes and numerics of a GPT-2 model; defaults are GPT-2 124M."""

    block_size: int = 1024  # max sequence length (n_positions)
    vocab_size: int = 50257  # true vocabulary; logits always have this many columns
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_multiple: int = 64  # wte rows are padded up to a multiple of this (50257 -> 50304)
    dtype: DType = "float32"  # compute dtype of matmuls and activations
    param_dtype: DType = "float32"  # storage dtype of parameters
    # jax.nn.dot_product_attention's XLA or cuDNN implementation, or tiled (flax_gpt.tiled_attention, for CPUs)
    attention: Attention = "xla"
    # 16-bit matmuls: "float32" accumulates and returns float32 (preferred_element_type); "compute" returns the
    # compute dtype, cast to float32 after (for backends that ignore preferred_element_type, e.g. jax-mps)
    matmul_output: Literal["float32", "compute"] = "float32"
    remat: bool = False  # recompute block activations in the backward pass (saves memory)
    scan_layers: bool = False  # run the blocks as a rolled loop: compile time flat in depth, slower steps
    dropout: float = 0.0  # nanoGPT's: on the embeddings, attention probabilities, attention and MLP outputs (train mode)
    gelu: Literal["tanh", "exact"] = "tanh"  # GPT-2's tanh approximation, or nanoGPT's exact (erf) GELU

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "vocab_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"GPTConfig.{name} must be 'float32', 'bfloat16' or 'float16', got {getattr(self, name)!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"GPTConfig.attention must be 'xla', 'cudnn' or 'tiled', got {self.attention!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.gelu not in ("tanh", "exact"):
            raise ValueError(f"GPTConfig.gelu must be 'tanh' or 'exact', got {self.gelu!r}")
        if self.matmul_output not in ("float32", "compute"):
            raise ValueError(f"GPTConfig.matmul_output must be 'float32' or 'compute', got {self.matmul_output!r}")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the token embedding: vocab_size rounded up to vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "small": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256),  # ~30M, CPU default
    "tiny": GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64),  # tests
}


def preset(name: str, **overrides) -> GPTConfig:
    """The named preset, with fields overridden; unknown names raise ValueError."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
