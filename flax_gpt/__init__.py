"""flax-gpt: GPT-2 in JAX/Flax, proven equal to the PyTorch model it ports."""

from flax_gpt.config import PRESETS, GPTConfig, preset
from flax_gpt.errors import UserError
from flax_gpt.model import GPT

__all__ = ["GPT", "GPTConfig", "PRESETS", "UserError", "preset"]
