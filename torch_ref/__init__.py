"""PyTorch reference GPT-2 (build-nanogpt semantics), its HF loader and a reference train step."""

from torch_ref.model import GPT, GPTConfig, hf_to_torch_state_dict, load_state_dict, torch_to_hf_state_dict
from torch_ref.train import get_lr, train_step
from torch_ref.transfer import config_from_flax, flax_to_torch, torch_to_flax

__all__ = [
    "GPT",
    "GPTConfig",
    "config_from_flax",
    "flax_to_torch",
    "get_lr",
    "hf_to_torch_state_dict",
    "load_state_dict",
    "torch_to_flax",
    "torch_to_hf_state_dict",
    "train_step",
]
