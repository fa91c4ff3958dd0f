"""Sampling from a GPT with a KV cache: prefill the prompt, then one-token decode steps.

    python -m flax_gpt.generate --init-from out --prompt "ROMEO:" --max-new-tokens 100 --num-samples 3

All shapes are fixed: the prompt is right-padded to a bucket (a multiple of 64, at most the
context) and the cache holds bucket + max_new_tokens positions, so a (batch, bucket,
max_new_tokens) compiles once and never per token. Padding is harmless: a decode step at
position p overwrites cache slot p before reading it, and attends to slots <= p only.
"""

from __future__ import annotations

import codecs
import dataclasses
import sys
from collections.abc import Iterator
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from flax import nnx

from flax_gpt import devices
from flax_gpt.config import AttentionFlag
from flax_gpt.errors import UserError, run_cli
from flax_gpt.load import load_model
from flax_gpt.model import GPT
from flax_gpt.tokenizer import get_encoding

PROMPT_BUCKET = 64


def filter_logits(logits, temperature: float, top_k: int | None, top_p: float | None):
    """Scale by temperature and mask (to -inf) what top-k / top-p exclude: logits (B, V)."""
    logits = logits / temperature  # (B, V)
    if top_k is not None:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]  # (B, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # (B, V) descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)  # (B, V)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # (B, V) probability of the higher-ranked tokens
        n_keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # (B, 1) smallest set reaching top_p
        cutoff = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)  # (B, 1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def _pick(logits, key, temperature: float, top_k, top_p):
    """Next token ids (B,) from last-position logits (B, V): argmax when temperature is 0."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p), axis=-1).astype(jnp.int32)


SAMPLING = ("temperature", "top_k", "top_p")


def _prefill(graphdef, params, prompt, prompt_len, key, cache_len: int, temperature: float, top_k, top_p):
    """Run the right-padded prompt (B, P) into a fresh cache; returns (first new token (B,), cache)."""
    model = nnx.merge(graphdef, params)
    cache = model.init_kv_cache(prompt.shape[0], cache_len)
    logits, cache = model.decode(prompt, cache, 0)  # (B, P, V)
    last = jax.lax.dynamic_index_in_dim(logits, prompt_len - 1, axis=1, keepdims=False)  # (B, V)
    return _pick(last, jax.random.fold_in(key, 0), temperature, top_k, top_p), cache


def _step(graphdef, params, token, cache, pos, key, i, temperature: float, top_k, top_p):
    """Feed token (B,) at position pos; returns (the i-th sampled token after the first (B,), cache)."""
    logits, cache = nnx.merge(graphdef, params).decode(token[:, None], cache, pos)  # (B, 1, V)
    return _pick(logits[:, 0], jax.random.fold_in(key, i), temperature, top_k, top_p), cache


_prefill_jit = jax.jit(_prefill, static_argnames=("graphdef", "cache_len", *SAMPLING))
_step_jit = jax.jit(_step, static_argnames=("graphdef", *SAMPLING), donate_argnames=("cache",))
_step_jit_copying = jax.jit(_step, static_argnames=("graphdef", *SAMPLING))  # platforms that cannot donate


def _check_and_pad(model: GPT, idx, max_new_tokens: int, temperature, top_k, top_p):
    """Validate a request; returns (right-padded prompt (B, P), prompt length)."""
    idx = np.asarray(idx, np.int32)
    B, T0 = idx.shape
    block = model.config.block_size
    if T0 < 1:
        raise UserError("the prompt is empty; give at least one token")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if T0 + max_new_tokens > block:
        raise UserError(f"prompt ({T0} tokens) + {max_new_tokens} new tokens = {T0 + max_new_tokens} exceeds the "
                        f"model's context of {block}; shorten the prompt or --max-new-tokens")
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 1):
        raise UserError("need temperature >= 0, top_k >= 1 and 0 < top_p <= 1")
    bucket = min(-(-T0 // PROMPT_BUCKET) * PROMPT_BUCKET, block)
    prompt = np.zeros((B, bucket), np.int32)  # (B, P) right-padded
    prompt[:, :T0] = idx
    return jnp.asarray(prompt), T0


def generate(model: GPT, idx, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> np.ndarray:
    """Continue prompts idx (B, T0) by max_new_tokens tokens; returns (B, T0 + max_new_tokens) ids.

    The tokens of `stream`: a jitted step per token with the cache donated, which updates the cache in place;
    one program scanning over the tokens carries the cache through its loop and was slower on CPU (gpt2: 25.4
    against 29.1 new tokens/s).
    """
    new = np.stack(list(stream(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=seed)), axis=1)  # (B, max_new_tokens)
    return np.concatenate([np.asarray(idx, np.int32), new], axis=1)


def stream(model: GPT, idx, max_new_tokens: int, *, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> Iterator[np.ndarray]:
    """Yield the new tokens (B,) one step at a time; the same tokens generate() returns."""
    prompt, T0 = _check_and_pad(model, idx, max_new_tokens, temperature, top_k, top_p)
    graphdef, params = nnx.split(model)
    step = _step_jit if devices.capabilities(devices.current_platform()).donation else _step_jit_copying
    sampling = dict(temperature=float(temperature), top_k=top_k, top_p=top_p)
    key = jax.random.key(seed)
    token, cache = _prefill_jit(graphdef, params, prompt, jnp.int32(T0), key, prompt.shape[1] + max_new_tokens, **sampling)
    for i in range(1, max_new_tokens):
        yield np.asarray(token)
        token, cache = step(graphdef, params, token, cache, jnp.int32(T0 + i - 1), key, i, **sampling)
    yield np.asarray(token)


# ----------------------------------------------------------------------------- CLI


@dataclasses.dataclass
class GenerateConfig:
    """Sample text from a training checkpoint, an HF directory or a hub id."""

    init_from: str  # a training out dir / checkpoints dir, an HF directory, a build-nanogpt / nanoGPT .pt, or a hub id
    prompt: str = "\n"  # text to continue
    max_new_tokens: int = 100
    num_samples: int = 3
    seed: int = 1337
    temperature: float = 1.0  # 0 means greedy
    top_k: int | None = 50
    top_p: float | None = None
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    attention: AttentionFlag = "auto"  # of the prompt (decoding is XLA's); auto: cuDNN on CUDA in bf16, else XLA's
    debug: bool = False  # show tracebacks instead of one-line errors


def _print_stream(enc, prompt_ids: list[int], tokens: Iterator[np.ndarray], out) -> list[int]:
    """Print the prompt, then each new token's text as it arrives; returns all ids."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a token may end mid-character
    out.write(enc.decode(prompt_ids))
    ids = list(prompt_ids)
    for token in tokens:
        ids.append(int(token[0]))
        out.write(decoder.decode(enc.decode_single_token_bytes(ids[-1])))
        out.flush()
    out.write(decoder.decode(b"", final=True) + "\n")
    return ids


def main(argv=None) -> int:
    cfg = tyro.cli(GenerateConfig, args=argv, description=__doc__)

    def sample_all() -> None:
        if cfg.num_samples < 1:
            raise UserError(f"--num-samples must be at least 1, got {cfg.num_samples}")
        devices.enable_compile_cache()
        dtype, numerics = devices.model_numerics(cfg.dtype, cfg.attention)
        model = load_model(cfg.init_from, dtype=dtype, **numerics)
        enc = get_encoding()
        prompt_ids = enc.encode(cfg.prompt, allowed_special={"<|endoftext|>"})
        if model.config.vocab_size < enc.n_vocab:
            raise UserError(f"{cfg.init_from}: the model's vocabulary ({model.config.vocab_size}) is smaller than "
                            f"GPT-2's ({enc.n_vocab}); it was not trained on GPT-2 tokens")
        for k in range(cfg.num_samples):
            print(f"--- sample {k + 1}/{cfg.num_samples} (seed {cfg.seed + k})")
            tokens = stream(model, [prompt_ids], cfg.max_new_tokens, temperature=cfg.temperature,
                            top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed + k)
            _print_stream(enc, prompt_ids, tokens, sys.stdout)

    return run_cli(sample_all, cfg.debug)[1] or 0


if __name__ == "__main__":
    raise SystemExit(main())
