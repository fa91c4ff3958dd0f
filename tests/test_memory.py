"""Training memory from XLA's analysis of the compiled step (compile only, on the CPU): bf16 activations cost
about half of fp32's, remat cuts them in bf16 as in fp32, and the loss never holds the (B, T, V) logits.

Per sequence means the step at B=8 minus the step at B=4, over 4: what grows with the batch (both past
ops.FULL_LOGITS_TOKENS, so the loss runs in chunks in both). gpt2's shapes at T=1024 with 6 layers;
benchmarks/memory.py measures all 12.
"""

import sys
from pathlib import Path

import pytest

from flax_gpt import preset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from memory import loss_temp_bytes, step_temp_bytes  # noqa: E402

LAYERS = 6  # remat keeps one layer's activations besides the inputs of all: at 2 layers that one is most of it


def per_sequence(dtype: str, remat: bool) -> float:
    config = preset("gpt2", n_layer=LAYERS, dtype=dtype, remat=remat)
    return (step_temp_bytes(config, 8, 1024) - step_temp_bytes(config, 4, 1024)) / 4


@pytest.fixture(scope="module")
def measured():
    return {(d, r): per_sequence(d, r) for d in ("float32", "bfloat16") for r in (False, True)}


def test_bf16_activations_cost_about_half_of_fp32(measured):
    ratio = measured["bfloat16", False] / measured["float32", False]
    assert ratio <= 0.6, ratio  # measured 0.56 (6 layers here and 12 layers in benchmarks/memory.py)


def test_remat_cuts_bf16_activations_as_it_cuts_fp32(measured):
    bf16 = measured["bfloat16", True] / measured["bfloat16", False]
    fp32 = measured["float32", True] / measured["float32", False]
    assert bf16 <= 0.3 and fp32 <= 0.3, (bf16, fp32)  # measured 0.07 and 0.12 (12 layers: 0.24 and 0.17)


def test_remat_cuts_a_gpt2_bf16_step_to_under_0_3():
    """What --remat is for, as benchmarks/memory.py measures it: all 12 layers, B=8, T=1024, the whole step's temp
    memory (gradients and AdamW temporaries included), bf16 with remat against bf16 without. Measured 1.14 / 3.91 GiB
    = 0.292; autodiff of jax.checkpoint blocks, which flax_gpt.remat replaces, gave 0.325."""
    with_remat, without = (step_temp_bytes(preset("gpt2", dtype="bfloat16", remat=r), 8, 1024) for r in (True, False))
    assert with_remat <= 0.3 * without, with_remat / without


def test_the_loss_never_holds_the_full_logits():
    config = preset("gpt2")
    full, chunked = ({B: loss_temp_bytes(config, B, 1024, c) for B in (4, 8)} for c in (False, True))
    logits = 4 * 1024 * config.padded_vocab_size * 4  # (4, 1024, Vp) float32: 0.77 GiB
    assert full[8] - full[4] >= logits  # plain autodiff holds the logits (and more) for every sequence
    assert chunked[8] <= 1.05 * chunked[4], chunked  # the chunks' memory does not grow with the batch
