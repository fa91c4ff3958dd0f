"""The jitted programs train.py, evaluate and generate run on `mps`, lowered for it with the jax-mps stand-in of
tests/jax_mps_lowering.py: each program's op names, custom-call targets and fused calls, as JSON on stdout.

    python tests/jax_mps_programs.py      # run by tests/test_jax_mps_ops.py in a fresh process

Nothing is computed: parameters and batches are abstract (jax.ShapeDtypeStruct), so the model can have
GPT-2's vocabulary and context at no cost. Numerics are what `mps` gets in flax_gpt/devices.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"  # before jax is imported: only the CPU backend ever starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import jax_mps_lowering as mps  # noqa: E402
from flax_gpt import devices, evaluate, generate, ops  # noqa: E402
from flax_gpt.config import GPTConfig  # noqa: E402
from flax_gpt.model import GPT  # noqa: E402
from flax_gpt.optim import OptimConfig, lr_schedule, make_optimizer  # noqa: E402
from flax_gpt.train_step import init_state, make_eval_step, make_train_step  # noqa: E402

CAPS = devices.capabilities("mps")
OPTIM = OptimConfig(warmup_steps=10, max_steps=100)
LONG = (3, 1024)  # (B, T): attention by blocks of queries, the loss chunk by chunk
SHORT = (2, 64)  # one attention block, the full logits
assert LONG[1] > ops.ATTENTION_BLOCK and ops.loss_in_chunks(LONG[0] * LONG[1])
assert SHORT[1] <= ops.ATTENTION_BLOCK and not ops.loss_in_chunks(SHORT[0] * SHORT[1])


def model_config(dtype: str = "bfloat16", **numerics) -> GPTConfig:
    """Two narrow layers with GPT-2's vocabulary and context, in mps's numerics."""
    return GPTConfig(n_layer=2, n_head=2, n_embd=64, dtype=dtype, matmul_output=CAPS.matmul_output,
                     attention=devices.attention_implementation("auto", "mps", dtype), **numerics)


def abstract_model(config: GPTConfig):
    """(graphdef, parameters) of a GPT, the parameters abstract (shapes and dtypes)."""
    return nnx.split(nnx.eval_shape(lambda: GPT(config)), nnx.Param)


def tokens(*shape):
    """Abstract int32 token ids of the shape."""
    return jax.ShapeDtypeStruct(shape, jnp.int32)


def train_step(dtype: str, shape: tuple[int, int], accum: int = 1, optimizer: str = "adamw", **numerics):
    """train.py's step (no donation on mps) over (accum, B, T) batches, with --optimizer optimizer."""
    config = model_config(dtype, **numerics)
    optim = dataclasses.replace(OPTIM, optimizer=optimizer)
    tx = make_optimizer(optim)
    graphdef, _ = abstract_model(config)
    state = jax.eval_shape(lambda: init_state(GPT(config), tx)[1])
    step = make_train_step(graphdef, tx, lr_schedule(optim), donate=CAPS.donation)
    return mps.lower(step, state, tokens(accum, *shape), tokens(accum, *shape))


def init():
    """A fresh TrainState: the random init (eager on one device, the same ops) and AdamW's zeros."""
    config, tx = model_config(), make_optimizer(OPTIM)
    return mps.lower(lambda: init_state(GPT(config, seed=0), tx)[1])


def eval_step(shape: tuple[int, int]):
    """train.py's validation loss of a (B, T) batch."""
    graphdef, params = abstract_model(model_config())
    return mps.lower(make_eval_step(graphdef), params, tokens(*shape), tokens(*shape))


def loss_step():
    """evaluate --data: summed token losses of a (B, T) batch from the full logits."""
    model = nnx.eval_shape(lambda: GPT(model_config()))
    state = nnx.split(model)[1]
    mask = jax.ShapeDtypeStruct(SHORT, jnp.float32)
    return mps.lower(evaluate.make_loss_step(model), state, tokens(*SHORT), tokens(*SHORT), mask)


def hellaswag_step():
    """HellaSwag scoring (evaluate --hellaswag, train.py --hellaswag): 4 endings of 2 examples, 96 tokens."""
    graphdef, params = abstract_model(model_config())
    return mps.lower(evaluate.make_hellaswag_step(graphdef, ending_len=24), params, tokens(8, 96), tokens(8, 96))


SAMPLING = {"top_k": dict(temperature=1.0, top_k=50, top_p=None),  # generate's defaults
            "top_p": dict(temperature=0.8, top_k=None, top_p=0.9),
            "greedy": dict(temperature=0.0, top_k=None, top_p=None)}


def prefill(sampling: str):
    """generate's prompt pass into a fresh KV cache: one bucket of prompt, 32 new tokens."""
    graphdef, params = abstract_model(model_config())
    return mps.lower(generate._prefill_jit, graphdef, params, tokens(2, generate.PROMPT_BUCKET), jnp.int32(10),
                     jax.random.key(0), cache_len=generate.PROMPT_BUCKET + 32, **SAMPLING[sampling])


def decode_step(sampling: str):
    """generate's one-token step (the copying one: no donation on mps)."""
    config = model_config()
    graphdef, params = abstract_model(config)
    cache = jax.eval_shape(lambda: GPT(config).init_kv_cache(2, generate.PROMPT_BUCKET + 32))
    return mps.lower(generate._step_jit_copying, graphdef, params, tokens(2), cache, jnp.int32(11), jax.random.key(0),
                     2, **SAMPLING[sampling])


P = functools.partial
PROGRAMS = {
    "init": init,
    "train fp32": P(train_step, "float32", LONG),
    "train fp32 short": P(train_step, "float32", SHORT),
    "train bf16": P(train_step, "bfloat16", LONG),
    "train bf16 short": P(train_step, "bfloat16", SHORT),
    "train bf16 remat": P(train_step, "bfloat16", LONG, remat=True),
    "train fp32 remat short": P(train_step, "float32", SHORT, remat=True),
    "train bf16 accum 2": P(train_step, "bfloat16", LONG, accum=2),
    "train bf16 scan-layers": P(train_step, "bfloat16", LONG, scan_layers=True),
    "train bf16 muon": P(train_step, "bfloat16", LONG, optimizer="muon"),
    "eval": P(eval_step, LONG),
    "eval short": P(eval_step, SHORT),
    "evaluate loss": loss_step,
    "hellaswag": hellaswag_step,
    **{f"prefill {s}": P(prefill, s) for s in SAMPLING},
    **{f"decode {s}": P(decode_step, s) for s in SAMPLING},
}

# Programs the check must refuse, one for each way a program can fail it.
X = jax.ShapeDtypeStruct((4,), jnp.float32)
CONTROLS = {
    "stablehlo.rng": lambda: mps.lower(lambda: jax.lax.rng_uniform(0.0, 1.0, (4,))),  # no handler
    "unknown target": lambda: mps.lower(  # a custom call HandleCustomCall does not know
        lambda x: jax.ffi.ffi_call("flax_gpt_no_such_target", X)(x), X),
    "jax.nn.gelu": lambda: mps.lower(jax.nn.gelu, X),  # jax-mps would send it to mps.gelu
    "eigh": lambda: mps.lower(lambda: jnp.linalg.eigh(jnp.eye(3))),  # jax-mps's own lowering, not modelled
}


def lowered_ops(make) -> dict:
    """{"ops", "custom_calls", "fused"} of the program make() lowers, or {"error"} if it does not lower."""
    mps.FUSED_CALLS.clear()
    try:
        lowered = make()
    except NotImplementedError as e:
        return {"error": str(e)}
    return {**mps.plugin_ops(lowered), "fused": sorted(set(mps.FUSED_CALLS))}


def report() -> dict:
    """{"programs": {name: lowered_ops}, "controls": {name: lowered_ops}}, the jax-mps stand-in installed."""
    mps.install()
    return {"programs": {name: lowered_ops(make) for name, make in PROGRAMS.items()},
            "controls": {name: lowered_ops(make) for name, make in CONTROLS.items()}}


if __name__ == "__main__":
    json.dump(report(), sys.stdout, indent=1)
    print()
