"""Generation: KV-cache decoding equals recomputation, greedy equals transformers, seeds repeat."""

import numpy as np
import pytest

from flax_gpt import GPT
from flax_gpt.errors import UserError
from flax_gpt.generate import generate
from parity_tests import checks
from parity_tests.test_flax_parity import SHAPES, assert_within


@pytest.mark.parametrize("shape", SHAPES)
def test_kv_cache_logits_equal_full_recompute(shape):
    assert_within(checks.kv_cache_vs_recompute(shape))


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_generation_is_token_identical_to_transformers(shape):
    assert_within(checks.greedy_vs_transformers(shape))


def test_same_seed_same_samples_other_seed_other_samples():
    model = GPT.from_pretrained(checks.hf_dir("odd"))
    idx = checks.tokens("odd", batch=3, seq_len=4)
    a = generate(model, idx, 12, temperature=1.0, top_k=20, top_p=0.95, seed=7)
    b = generate(model, idx, 12, temperature=1.0, top_k=20, top_p=0.95, seed=7)
    c = generate(model, idx, 12, temperature=1.0, top_k=20, top_p=0.95, seed=8)
    assert a.shape == (3, 16) and (a[:, :4] == idx).all()
    assert (a == b).all()
    assert (a != c).any()


def test_top_k_one_is_greedy():
    model = GPT.from_pretrained(checks.hf_dir("tiny"))
    idx = checks.tokens("tiny", batch=2, seq_len=5)
    assert (generate(model, idx, 8, temperature=0.8, top_k=1, seed=3) == generate(model, idx, 8, temperature=0)).all()


def test_prompt_longer_than_context_is_rejected():
    model = GPT.from_pretrained(checks.hf_dir("deep"))  # block_size 32
    with pytest.raises(UserError, match="exceeds the model's context of 32"):
        generate(model, np.zeros((1, 30), np.int64), 5)


def test_decode_compiles_once_per_bucket():
    from flax_gpt import generate as gen

    model = GPT.from_pretrained(checks.hf_dir("tiny"))
    compiled = (gen._prefill_jit, gen._step_jit)
    before = [f._cache_size() for f in compiled]
    for length in (3, 7, 11):  # one prompt bucket (<= 64), same batch and max_new_tokens
        generate(model, checks.tokens("tiny", batch=1, seq_len=length), 6, temperature=0)
    assert [f._cache_size() - b for f, b in zip(compiled, before)] == [1, 1]  # one prefill, one decode step


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_k=10, seed=4),
                                      dict(temperature=0.9, top_p=0.8, seed=2)])
def test_stream_yields_what_generate_returns(sampling):
    from flax_gpt.generate import stream

    model = GPT.from_pretrained(checks.hf_dir("odd"))
    idx = checks.tokens("odd", batch=2, seq_len=5)
    streamed = np.stack(list(stream(model, idx, 15, **sampling)), axis=1)  # (B, 15)
    assert (generate(model, idx, 15, **sampling)[:, 5:] == streamed).all()
