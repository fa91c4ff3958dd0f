"""Weights both ways between torch_ref.GPT and flax_gpt.GPT, through HF GPT-2 tensor names.

Both sides speak HF's layout ('transformer.' keys, Conv1D (in, out), unpadded wte, float32):
flax_gpt.hf.to_hf_state_dict / from_hf_state_dict on one side, torch_to_hf_state_dict /
hf_to_torch_state_dict on this one. flax_gpt is imported lazily: torch_ref works without JAX.
"""

from __future__ import annotations

from torch_ref.model import GPT, GPTConfig, hf_to_torch_state_dict, load_state_dict, torch_to_hf_state_dict


def config_from_flax(cfg) -> GPTConfig:
    """The torch_ref config with the shapes of a flax_gpt.GPTConfig (true, unpadded vocab)."""
    return GPTConfig(
        block_size=cfg.block_size,
        vocab_size=cfg.vocab_size,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.n_embd,
        dropout=cfg.dropout,
        gelu=cfg.gelu,
    )


def flax_to_torch(flax_model) -> GPT:
    """A torch_ref.GPT (float32) holding the weights of a flax_gpt.GPT."""
    from flax_gpt.hf import to_hf_state_dict

    model = GPT(config_from_flax(flax_model.config))
    return load_state_dict(model, hf_to_torch_state_dict(to_hf_state_dict(flax_model)))


def torch_to_flax(torch_model: GPT, flax_config):
    """A flax_gpt.GPT built with flax_config (dtype, padding, ...) holding torch_model's weights."""
    from flax_gpt.hf import from_hf_state_dict

    shapes = config_from_flax(flax_config)
    if shapes != torch_model.config:
        raise ValueError(f"flax config shapes {shapes} differ from the torch model's {torch_model.config}")
    return from_hf_state_dict(torch_to_hf_state_dict(torch_model), flax_config)
