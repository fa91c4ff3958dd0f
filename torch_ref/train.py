"""The reference training step: build-nanogpt's learning-rate schedule and accumulation loop."""

from __future__ import annotations

import math

import torch


def get_lr(it: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """build-nanogpt's schedule: linear warmup, cosine decay to min_lr, then min_lr."""
    # 1) linear warmup for warmup_steps steps
    if it < warmup_steps:
        return max_lr * (it + 1) / warmup_steps
    # 2) if it > max_steps, return min learning rate
    if it > max_steps:
        return min_lr
    # 3) in between, use cosine decay down to min learning rate
    decay_ratio = (it - warmup_steps) / (max_steps - warmup_steps)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # coeff starts at 1 and goes to 0
    return min_lr + coeff * (max_lr - min_lr)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    lr: float,
    grad_clip: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[float, float]:
    """One optimizer step over len(micro_batches) accumulated micro batches of (x, y), each (B, T); with a
    GradScaler (float16 autocast), as torch's AMP recipe: scaled backward, unscale_, clip, scaler.step, update.
    optimizer may be a list (configure_muon_optimizers'): each zeroed, unscaled and stepped, the gradients clipped over
    all parameters; every group's lr is lr * its "lr_ratio" (1 where it has none).

    Returns (mean loss over the micro batches, gradient norm before clipping).
    """
    optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    model.train()
    for opt in optimizers:
        opt.zero_grad()
    grad_accum_steps = len(micro_batches)
    loss_accum = 0.0
    for x, y in micro_batches:
        if autocast_dtype is not None:
            with torch.autocast(device_type=x.device.type, dtype=autocast_dtype):
                logits, loss = model(x, y)  # (B, T, V), scalar
        else:
            logits, loss = model(x, y)  # (B, T, V), scalar
        # the loss is a mean over each micro batch; scale so the gradients add up to the full batch mean
        loss = loss / grad_accum_steps
        loss_accum += loss.detach().item()
        (loss if scaler is None else scaler.scale(loss)).backward()
    if scaler is not None:
        for opt in optimizers:
            scaler.unscale_(opt)  # the gradients unscaled in place, inf/NaN noted
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for opt in optimizers:
        for param_group in opt.param_groups:
            param_group["lr"] = lr * param_group.get("lr_ratio", 1.0)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)  # skipped when the gradients hold an inf or NaN
    if scaler is not None:
        scaler.update()
    for opt in optimizers:
        opt.zero_grad()
    return loss_accum, float(norm)
