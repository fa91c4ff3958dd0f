"""Muon parity against torch.optim.Muon (torch_ref's configure_muon_optimizers: Muon on the blocks' weight matrices,
nanoGPT's AdamW on the rest): the Newton-Schulz iteration, one step (parameters and the momentum buffer), a
trajectory with gradient accumulation, and one bf16 step against torch autocast. Bounds: checks.py's table."""

from __future__ import annotations

from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

import torch_ref
from flax_gpt import GPT
from flax_gpt.hf import to_hf_state_dict
from parity_tests.checks import (ADAMW_STEP_REL, BF16_REL, KEY_BIAS_STEP, MUON_BF16_OWN_FLOOR, MUON_MOMENTUM_REL,
                                 MUON_NS_REL, MUON_STEP_REL, MUON_TRAJECTORY_MOMENTUM_REL, MUON_TRAJECTORY_REL,
                                 SHAPES_BY_NAME, Measurement, _batches, _flax_trainer, _key_bias_split, _opt_cfg,
                                 _torch_lr, _with_values, hf_dir, rel)
from torch_ref.model import CONV1D_SUFFIXES

STEPS = 20  # the trajectory's, and the schedule's max_steps (checks._opt_cfg)
NS_SHAPES = ((32, 96), (96, 32), (48, 48))  # wide, tall, square: odd's c_attn (as torch holds it, and as flax), c_proj


def _muon_cfg(**overrides):
    """checks._opt_cfg with --optimizer muon at lr 0.02 (the bounds were measured there); Muon's weight decay on, so
    that its path is compared too."""
    return _opt_cfg(**{**dict(optimizer="muon", muon_lr=0.02, muon_weight_decay=0.1), **overrides})


def newton_schulz_vs_torch(jit: bool = False) -> Measurement:
    """flax_gpt.muon.newton_schulz against torch's _zeropower_via_newtonschulz (bf16) on NS_SHAPES, the same float32
    input: the worst relative difference of the bf16 outputs, eager or jitted."""
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS, _zeropower_via_newtonschulz

    from flax_gpt.muon import newton_schulz

    ns = jax.jit(newton_schulz) if jit else newton_schulz
    worst = 0.0
    for i, shape in enumerate(NS_SHAPES):
        g = np.random.default_rng(i).standard_normal(shape).astype(np.float32)
        ref = _zeropower_via_newtonschulz(torch.from_numpy(g), (DEFAULT_A, DEFAULT_B, DEFAULT_C), DEFAULT_NS_STEPS, EPS)
        worst = max(worst, rel(np.asarray(ns(jnp.asarray(g)).astype(jnp.float32)), ref.float().numpy()))
    return Measurement(f"Muon Newton-Schulz flax{' (jit)' if jit else ''} vs torch, bf16, "
                       f"{', '.join('x'.join(map(str, s)) for s in NS_SHAPES)} worst relative", worst, MUON_NS_REL)


def _torch_muon_trainer(shape: str, c):
    model = torch_ref.GPT.from_pretrained(str(hf_dir(shape)))
    return model, model.configure_muon_optimizers(c.weight_decay, c.lr, "cpu", c.muon_lr, c.muon_momentum,
                                                  c.muon_weight_decay)


def _is_muon(name: str) -> bool:
    return name.endswith(CONV1D_SUFFIXES)


def _flax_momentum(graphdef, state) -> dict[str, np.ndarray]:
    """The ScaleByMuonState's momentum as HF-named (in, out) tensors, zeros for the AdamW parameters."""
    from flax_gpt.muon import ScaleByMuonState

    muon, = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: isinstance(s, ScaleByMuonState))
             if isinstance(s, ScaleByMuonState)]
    filled = jax.tree.map(lambda m, p: jnp.zeros_like(p) if isinstance(m, optax.MaskedNode) else m, muon.momentum,
                          state.params, is_leaf=lambda m: isinstance(m, optax.MaskedNode))
    return to_hf_state_dict(nnx.merge(graphdef, filled))


def _torch_momentum(model: torch_ref.GPT, muon: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    """torch.optim.Muon's momentum_buffer of each weight, (out, in), as HF-named (in, out) tensors; zeros elsewhere."""
    bufs = {n: muon.state[p]["momentum_buffer"] if p in muon.state else torch.zeros_like(p)
            for n, p in model.named_parameters()}
    return torch_ref.torch_to_hf_state_dict(_with_values(model, bufs))


def _groups_of(model: torch_ref.GPT, optimizers) -> dict[str, str]:
    """Each parameter's HF name -> "muon", "decay" or "no decay": the torch_ref optimizer group holding it."""
    group_of = {}
    for opt in optimizers:
        for group in opt.param_groups:
            kind = "muon" if isinstance(opt, torch.optim.Muon) else "decay" if group["weight_decay"] else "no decay"
            group_of |= {id(p): kind for p in group["params"]}
    return {n.removeprefix("transformer."): group_of[id(p)] for n, p in model.named_parameters()}


def muon_groups_flax_vs_torch_ref(shape: str = "odd") -> Measurement:
    """optim.muon_labels and decay_mask against configure_muon_optimizers' groups: the parameters (HF names) that sit
    in another group on the two sides."""
    from flax_gpt.optim import decay_mask, muon_labels

    graphdef, params = nnx.split(GPT.from_pretrained(hf_dir(shape)), nnx.Param)
    kinds = ("muon", "decay", "no decay")
    code = jax.tree.map(lambda label, decay, p: jnp.full_like(p, 0 if label == "muon" else 1 if decay else 2),
                        muon_labels(params), decay_mask(params), params)
    ours = {k.removeprefix("transformer."): kinds[int(v.flat[0])]
            for k, v in to_hf_state_dict(nnx.merge(graphdef, code)).items()}
    model, opts = _torch_muon_trainer(shape, _muon_cfg())
    ref = _groups_of(model, opts)
    assert ours.keys() == ref.keys(), sorted(set(ours) ^ set(ref))
    return Measurement(f"Muon / AdamW decay / no-decay groups flax vs torch_ref [{shape}] parameters in another group",
                       float(sum(ours[k] != ref[k] for k in ref)), 0.0)


@cache
def _run(shape: str, dtype: str, steps: int, micro: int = 2) -> tuple[dict, dict]:
    """steps clipped Muon + AdamW steps (warmup + cosine to step STEPS, weight decay) from the same weights on the same
    batches, each of `micro` accumulated micro batches of 2, flax and torch_ref (under autocast for bf16): for each
    side its per-step losses, its parameters and momentum after the first step and its momentum after the last, as
    HF-named (in, out) float32 arrays. One compiled step serves the one-step and the trajectory checks (cached: call
    it with the same positional arguments)."""
    c = _muon_cfg(max_steps=STEPS)
    graphdef, state, step = _flax_trainer(shape, c, dtype=dtype)
    model, opts = _torch_muon_trainer(shape, c)
    ours, ref = {"loss": []}, {"loss": []}
    for i, (x, y) in enumerate(_batches(shape, steps, batch=2 * micro)):
        xs, ys = x.reshape(micro, -1, x.shape[1]), y.reshape(micro, -1, y.shape[1])  # (A, B, T)
        state, metrics = step(state, jnp.asarray(xs), jnp.asarray(ys))
        micro_batches = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in zip(xs, ys)]
        loss, _ = torch_ref.train_step(model, opts, micro_batches, _torch_lr(i, c),
                                       autocast_dtype=None if dtype == "float32" else torch.bfloat16)
        ours["loss"].append(float(metrics["loss"]))
        ref["loss"].append(loss)
        if i == 0:
            ours |= {"params": to_hf_state_dict(nnx.merge(graphdef, state.params)),
                     "momentum": _flax_momentum(graphdef, state)}
            ref |= {"params": torch_ref.torch_to_hf_state_dict(model), "momentum": _torch_momentum(model, opts[0])}
    ours["last momentum"], ref["last momentum"] = _flax_momentum(graphdef, state), _torch_momentum(model, opts[0])
    return ours, ref


def muon_step_flax_vs_torch_ref(shape: str = "odd") -> list[Measurement]:
    """The first step of _run, fp32: the Muon matrices after, the AdamW parameters after (key-bias slice apart, as
    checks.adamw_step_flax_vs_torch_ref does), and Muon's momentum buffer."""
    ours, ref = _run(shape, "float32", STEPS)
    C = SHAPES_BY_NAME[shape].n_embd
    (ours_rest, ours_kb), (ref_rest, ref_kb) = _key_bias_split(ours["params"], C), _key_bias_split(ref["params"], C)
    matrices, lr = [k for k in ref["params"] if _is_muon(k)], _torch_lr(0, _muon_cfg(max_steps=STEPS))
    return [Measurement(f"one Muon step flax vs torch_ref [{shape}] Muon matrices after, worst relative",
                        max(rel(ours["params"][k], ref["params"][k]) for k in matrices), MUON_STEP_REL),
            Measurement(f"one Muon step flax vs torch_ref [{shape}] AdamW parameters after, worst relative",
                        max(rel(ours_rest[k], ref_rest[k]) for k in ref_rest if not _is_muon(k)), ADAMW_STEP_REL),
            Measurement(f"one Muon step [{shape}] key-bias slice |diff| / (2 lr)",
                        max(np.abs(ours_kb[k] - ref_kb[k]).max() for k in ref_kb) / (2 * lr), KEY_BIAS_STEP),
            Measurement(f"one Muon step flax vs torch_ref [{shape}] momentum buffer, worst relative",
                        max(rel(ours["momentum"][k], ref["momentum"][k]) for k in matrices), MUON_MOMENTUM_REL)]


def muon_trajectory_flax_vs_torch_ref(shape: str = "odd", steps: int = STEPS) -> list[Measurement]:
    """_run's steps, fp32: the worst per-step loss, and Muon's momentum buffer after the last step."""
    ours, ref = _run(shape, "float32", steps)
    matrices = [k for k in ref["params"] if _is_muon(k)]
    label = f"[{shape}, 2 micro batches]"
    return [Measurement(f"{steps}-step Muon trajectory flax vs torch_ref {label} worst per-step loss relative",
                        max(abs(a - b) / abs(b) for a, b in zip(ours["loss"], ref["loss"])), MUON_TRAJECTORY_REL),
            Measurement(f"{steps}-step Muon trajectory flax vs torch_ref {label} momentum buffer after, worst relative",
                        max(rel(ours["last momentum"][k], ref["last momentum"][k]) for k in matrices),
                        MUON_TRAJECTORY_MOMENTUM_REL)]


def muon_bf16_step_vs_autocast(shape: str = "odd") -> list[Measurement]:
    """_run with bf16 compute against torch_ref's under autocast(bfloat16): every parameter after the first step
    (key-bias slice apart) and the worst per-step loss of the trajectory; and each side's Muon matrices after the
    first step against its own fp32 step, which must show bf16 (floor)."""
    C = SHAPES_BY_NAME[shape].n_embd
    (ours, ref), (ours32, ref32) = _run(shape, "bfloat16", STEPS), _run(shape, "float32", STEPS)
    ours_rest, ref_rest = _key_bias_split(ours["params"], C)[0], _key_bias_split(ref["params"], C)[0]
    matrices = [k for k in ref["params"] if _is_muon(k)]
    return [Measurement(f"one bf16 Muon step flax vs torch autocast [{shape}] params after, worst relative",
                        max(rel(ours_rest[k], ref_rest[k]) for k in ref_rest), BF16_REL),
            Measurement(f"{STEPS}-step bf16 Muon trajectory flax vs torch autocast [{shape}, 2 micro batches] worst "
                        "per-step loss relative", max(abs(a - b) / abs(b) for a, b in zip(ours["loss"], ref["loss"])),
                        BF16_REL),
            Measurement(f"one bf16 Muon step flax vs its own fp32 step [{shape}] least changed Muon matrix relative",
                        min(rel(ours["params"][k], ours32["params"][k]) for k in matrices), BF16_REL,
                        MUON_BF16_OWN_FLOOR),
            Measurement(f"one Muon step torch autocast vs its own fp32 step [{shape}] least changed Muon matrix "
                        "relative", min(rel(ref["params"][k], ref32["params"][k]) for k in matrices), BF16_REL,
                        MUON_BF16_OWN_FLOOR)]


def all_muon_checks() -> list[Measurement]:
    """Every Muon measurement, for the report."""
    return [muon_groups_flax_vs_torch_ref(), newton_schulz_vs_torch(), newton_schulz_vs_torch(jit=True),
            *muon_step_flax_vs_torch_ref(), *muon_trajectory_flax_vs_torch_ref(), *muon_bf16_step_vs_autocast()]
