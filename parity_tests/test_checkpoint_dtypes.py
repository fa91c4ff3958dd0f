"""Old causal-mask buffers of any dtype are skipped unread; a parameter of an unreadable dtype is a named error."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from flax_gpt import GPT
from flax_gpt.hf import CheckpointError
from parity_tests import checks
from parity_tests.checkpoints import copy_checkpoint


def _rewrite(model_dir, change):
    """Apply change(tensors) to the weights file of model_dir (model.safetensors or pytorch_model.bin)."""
    path = model_dir / "model.safetensors"
    if path.is_file():
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path, metadata={"format": "pt"})
    else:
        path = model_dir / "pytorch_model.bin"
        tensors = torch.load(path, weights_only=True)
        change(tensors)
        torch.save(tensors, path)


def _with_buffers(tensors, dtype):
    """Add (or recast) h.{i}.attn.bias (1, 1, T, T) tril masks and h.{i}.attn.masked_bias, in `dtype`."""
    prefix = "transformer." if any(k.startswith("transformer.") for k in tensors) else ""
    T = checks.SHAPES_BY_NAME["tiny"].n_positions
    for i in range(checks.SHAPES_BY_NAME["tiny"].n_layer):
        tensors[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T).to(dtype)
        tensors[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4).to(dtype)


@pytest.mark.parametrize("layout", ("safetensors", "bin"))
def test_u8_and_bool_buffers_load_with_the_float32_buffers_logits(checkpoint_dir, tmp_path, layout):
    idx = checks.tokens("tiny")
    logits = {}
    for dtype in (torch.float32, torch.uint8, torch.bool):
        model_dir = copy_checkpoint(checkpoint_dir(layout), tmp_path / str(dtype))
        _rewrite(model_dir, lambda t: _with_buffers(t, dtype))
        logits[dtype] = checks.flax_logits(GPT.from_pretrained(str(model_dir)), idx)
    assert np.array_equal(logits[torch.uint8], logits[torch.float32])
    assert np.array_equal(logits[torch.bool], logits[torch.float32])


@pytest.mark.parametrize("layout, dtype_name", (("safetensors", "I64"), ("bin", "int64")))
def test_a_parameter_of_an_unreadable_dtype_is_a_one_line_error(checkpoint_dir, tmp_path, layout, dtype_name):
    model_dir = copy_checkpoint(checkpoint_dir(layout), tmp_path / "model")
    key = "transformer.h.0.mlp.c_fc.bias"
    _rewrite(model_dir, lambda t: t.__setitem__(key, t[key].to(torch.int64)))
    with pytest.raises(CheckpointError) as error:
        GPT.from_pretrained(str(model_dir))
    message = str(error.value)
    assert "\n" not in message
    assert f"tensor h.0.mlp.c_fc.bias has dtype {dtype_name}; parameters are read from " in message
    assert "truncated" not in message
