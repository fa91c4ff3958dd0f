"""flax-gpt: GPT-2 in JAX/Flax, proven equal to the PyTorch model it ports.

The model names below load on first use, so `import flax_gpt.tokenizer` (the data tools and their
tokenizer processes) does not import JAX.
"""

import importlib

from flax_gpt.errors import UserError

_LAZY = {"GPT": "flax_gpt.model", "GPTConfig": "flax_gpt.config", "PRESETS": "flax_gpt.config",
         "preset": "flax_gpt.config"}

__all__ = ["GPT", "GPTConfig", "PRESETS", "UserError", "preset"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flax_gpt' has no attribute {name!r}")
