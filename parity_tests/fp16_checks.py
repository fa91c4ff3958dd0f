"""float16 parity against torch autocast(float16) on the CPU: logits, loss and gradients (each side also against
its own fp32 run, which must show float16 rounding), and a training trajectory under dynamic loss scaling whose
scale grows every 2 good steps until float16 overflows: both sides must skip the same steps, as torch's GradScaler
does. Bounds: checks.py's tolerance table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import torch_ref
from flax_gpt import GPT
from flax_gpt.hf import to_hf_state_dict
from flax_gpt.train_step import loss_and_grads
from parity_tests.checks import (FP16_GRAD_REL, FP16_KL, FP16_OWN_FLOOR, FP16_OWN_GRAD_FLOOR, FP16_REL,
                                 FP16_TRAJECTORY_REL, Measurement, _batches, _opt_cfg, _torch_lr, _with_values,
                                 flax_hidden, flax_logits, hf_dir, low_precision_grad_measurements, rel, tokens,
                                 torch_hidden_and_logits)

SCALE = 2.0**16  # GradScaler's initial scale: the gradients are compared as each side takes them in training


def _kl(ours: np.ndarray, ref: np.ndarray) -> float:
    """Mean softmax KL(ref || ours) over the positions."""
    logp_ours = torch.log_softmax(torch.from_numpy(ours.astype(np.float64)), -1)
    logp_ref = torch.log_softmax(torch.from_numpy(ref.astype(np.float64)), -1)
    return float(torch.nn.functional.kl_div(logp_ours, logp_ref, log_target=True, reduction="none").sum(-1).mean())


def fp16_vs_autocast(shape: str) -> list[Measurement]:
    """flax float16 compute against torch_ref under torch.autocast(float16): logits and softmax KL; each side's
    blocks' output against its own fp32 run (floor FP16_OWN_FLOOR)."""
    idx = tokens(shape)
    ours32, ours = (GPT.from_pretrained(hf_dir(shape), dtype=d) for d in ("float32", "float16"))
    logits = flax_logits(ours, idx)
    ref_model = torch_ref.GPT.from_pretrained(str(hf_dir(shape))).eval()
    ref_hidden, ref_logits = torch_hidden_and_logits(ref_model, idx, autocast=True, dtype=torch.float16)
    ref32_hidden, _ = torch_hidden_and_logits(ref_model, idx, autocast=False)
    return [Measurement(f"fp16 logits flax vs torch autocast [{shape}] relative", rel(logits, ref_logits), FP16_REL),
            Measurement(f"fp16 flax vs torch autocast [{shape}] mean KL", _kl(logits, ref_logits), FP16_KL),
            Measurement(f"fp16 flax vs its own fp32 run [{shape}] blocks' output relative",
                        rel(flax_hidden(ours, idx), flax_hidden(ours32, idx)), FP16_REL, FP16_OWN_FLOOR),
            Measurement(f"torch autocast fp16 vs its own fp32 run [{shape}] blocks' output relative",
                        rel(ref_hidden, ref32_hidden), FP16_REL, FP16_OWN_FLOOR)]


def _flax_scaled_grads(model: GPT, idx: np.ndarray, scale: float) -> dict[str, np.ndarray]:
    """The train step's gradients: taken times scale (the loss scale), unscaled in float32; HF-named."""
    graphdef, params = nnx.split(model, nnx.Param)
    x, y = jnp.asarray(idx[:, :-1]), jnp.asarray(idx[:, 1:])
    _, grads = jax.jit(loss_and_grads, static_argnums=1)(params, graphdef, x, y, None, jnp.float32(scale))
    return to_hf_state_dict(nnx.merge(graphdef, jax.tree.map(lambda g: g / scale, grads)))


def _torch_scaled_grads(model: torch_ref.GPT, idx: np.ndarray, scale: float, autocast: bool) -> dict[str, np.ndarray]:
    """torch_ref's gradients of loss * scale under autocast(float16) (or fp32), divided by scale."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
        _, loss = model(torch.from_numpy(idx[:, :-1]), torch.from_numpy(idx[:, 1:]))
    (loss * scale).backward()
    grads = {name: p.grad / scale for name, p in model.named_parameters()}
    return {k: np.asarray(v) for k, v in torch_ref.torch_to_hf_state_dict(_with_values(model, grads)).items()}


def fp16_grads_vs_autocast(shape: str) -> list[Measurement]:
    """Every gradient with float16 compute and the loss scale, against torch_ref's under autocast(float16) with the
    same scale; each side against its own fp32 gradients (the least changed parameter reaches FP16_OWN_GRAD_FLOOR)."""
    idx = tokens(shape)
    fg32, fg = (_flax_scaled_grads(GPT.from_pretrained(hf_dir(shape), dtype=d), idx, SCALE)
                for d in ("float32", "float16"))
    ref_model = torch_ref.GPT.from_pretrained(str(hf_dir(shape)))
    tg32, tg = (_torch_scaled_grads(ref_model, idx, SCALE, autocast) for autocast in (False, True))
    return low_precision_grad_measurements("fp16", f"[{shape}]", f"[{shape}]", (fg, fg32, tg, tg32), FP16_GRAD_REL,
                                           FP16_OWN_GRAD_FLOOR)


FORCED = (4, 10, 16)  # steps run with a loss scale of 2**40: their gradients overflow float16 on both sides
FORCED_SCALE = 2.0**40


def grad_scaler_trajectory(shape: str = "tiny", steps: int = 20, growth_interval: int = 3,
                           forced: tuple[int, ...] = FORCED) -> tuple[list[Measurement], dict]:
    """steps of float16 training under dynamic loss scaling, from GradScaler's initial scale, doubling after every
    growth_interval good steps; the `forced` steps run with the scale set to 2**40 (GradScaler.update(new_scale) on
    torch's side), then it is set back to the initial scale. Both sides must skip exactly the forced steps, back off
    and grow the scale alike, leave AdamW's step count behind by the skips, and follow the same losses (the
    learning rate advances through a skipped step, as nanoGPT's get_lr(iter_num)). Returns the measurements and what
    each side did."""
    from flax_gpt import loss_scale
    from flax_gpt.optim import lr_schedule, make_optimizer
    from flax_gpt.train_step import init_state, make_train_step

    c = _opt_cfg(max_steps=steps)
    tx = make_optimizer(c)
    graphdef, state = init_state(GPT.from_pretrained(hf_dir(shape), dtype="float16"), tx)
    step = make_train_step(graphdef, tx, lr_schedule(c), growth_interval=growth_interval)
    model = torch_ref.GPT.from_pretrained(str(hf_dir(shape)))
    opt = model.configure_optimizers(c.weight_decay, c.lr, "cpu")
    scaler = torch.amp.GradScaler("cpu", init_scale=loss_scale.INIT_SCALE, growth_interval=growth_interval)
    ours, ref, worst = {"skipped": [], "scale_after": []}, {"skipped": [], "scale_after": []}, 0.0
    for i, (x, y) in enumerate(_batches(shape, steps)):
        if i in forced:
            state = state.replace(loss_scale=state.loss_scale.replace(scale=jnp.float32(FORCED_SCALE)))
            scaler.update(new_scale=FORCED_SCALE)
        state, metrics = step(state, jnp.asarray(x[None]), jnp.asarray(y[None]))
        before = scaler.get_scale()
        ref_loss, _ = torch_ref.train_step(model, opt, [(torch.from_numpy(x), torch.from_numpy(y))], _torch_lr(i, c),
                                           autocast_dtype=torch.float16, scaler=scaler)
        ours["scale_after"].append(float(state.loss_scale.scale))
        ref["scale_after"].append(scaler.get_scale())
        ours["skipped"] += [i] if bool(metrics["skipped"]) else []
        ref["skipped"] += [i] if scaler.get_scale() < before else []
        worst = max(worst, abs(float(metrics["loss"]) - ref_loss) / abs(ref_loss))
        if i in forced:
            state = state.replace(loss_scale=state.loss_scale.replace(scale=jnp.float32(loss_scale.INIT_SCALE)))
            scaler.update(new_scale=loss_scale.INIT_SCALE)
    ours["adam_count"] = int(next(s.count for s in jax.tree.leaves(state.opt_state, is_leaf=_is_adam)
                                  if _is_adam(s)))
    ref["adam_count"] = int(next(iter(opt.state.values()))["step"])
    label = f"[{shape}, {steps} steps, overflows forced at {', '.join(map(str, forced))}]"
    return [Measurement(f"fp16 GradScaler trajectory flax vs torch_ref {label} worst per-step loss relative", worst,
                        FP16_TRAJECTORY_REL),
            Measurement(f"fp16 GradScaler trajectory {label} steps skipped other than the forced ones, either side",
                        float(len(set(ours["skipped"]) ^ set(forced)) + len(set(ref["skipped"]) ^ set(forced))), 0.0),
            Measurement(f"fp16 GradScaler trajectory {label} steps whose scale after differs from torch's",
                        float(sum(a != b for a, b in zip(ours["scale_after"], ref["scale_after"]))), 0.0),
            Measurement(f"fp16 GradScaler trajectory {label} AdamW step count minus torch's",
                        float(abs(ours["adam_count"] - ref["adam_count"])), 0.0)], {"flax": ours, "torch": ref}


def _is_adam(s) -> bool:
    import optax

    return isinstance(s, optax.ScaleByAdamState)


def all_fp16_checks() -> list[Measurement]:
    """Every float16 measurement, for the report."""
    return [*fp16_vs_autocast("odd"), *fp16_grads_vs_autocast("odd"), *grad_scaler_trajectory()[0]]
