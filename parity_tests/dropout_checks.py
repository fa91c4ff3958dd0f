"""Dropout parity: flax_gpt's masks passed to torch_ref (its nanoGPT-style dropout given masks), flax against torch
with the same masks; p = 0 bit for bit the model without dropout; and, with each side drawing its own masks, the
train-mode loss averaged over many draws (torch's own F.dropout and SDPA dropout_p, as nanoGPT's model.py runs).
Bounds: checks.py's tolerance table."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from flax_gpt import GPT
from flax_gpt.hf import to_hf_state_dict
from parity_tests.checks import (BF16_REL, DROPOUT_CHANGES_FLOOR, DROPOUT_MEAN_SIGMAS, GRAD_REL, LOGITS_MAX_ABS,
                                 LOSS_REL, Measurement, hf_dir, max_abs, rel, small_blocks, tokens)
from torch_ref import torch_to_hf_state_dict
from torch_ref.transfer import flax_to_torch

P = 0.2  # nanoGPT's Shakespeare recipe
KEY = jax.random.PRNGKey(7)


def models(shape: str, dtype: str = "float32", gelu: str = "tanh") -> tuple[GPT, "torch.nn.Module"]:
    """(flax GPT, torch_ref GPT) of the shape's weights with dropout P, both in train mode (torch_ref fp32)."""
    ours = GPT.from_pretrained(hf_dir(shape), dtype=dtype, dropout=P, gelu=gelu)
    ref = flax_to_torch(GPT.from_pretrained(hf_dir(shape), dropout=P, gelu=gelu))
    ours.train()
    ref.train()
    return ours, ref


def flax_loss_and_grads(model: GPT, x, y, key) -> tuple[float, dict]:
    """GPT.loss (the train steps' loss) with the dropout key's masks and its gradients as HF-named tensors."""
    graphdef, params = nnx.split(model, nnx.Param)
    loss, grads = jax.jit(jax.value_and_grad(lambda p: nnx.merge(graphdef, p).loss(x, y, rngs=key)))(params)
    return float(loss), to_hf_state_dict(nnx.merge(graphdef, grads))


def torch_loss_and_grads(model, x, y, masks, autocast: bool = False) -> tuple[float, dict]:
    """torch_ref's loss dropping with the given masks (under autocast bf16 or not) and its gradients, HF-named."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _, loss = model(torch.from_numpy(x), torch.from_numpy(y), dropout_masks=masks)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    clone = type(model)(model.config)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            p.copy_(grads[name])
    return float(loss.detach()), {k: np.asarray(v) for k, v in torch_to_hf_state_dict(clone).items()}


def same_masks(shape: str, dtype: str = "float32", blocks: bool = False) -> list[Measurement]:
    """flax with the key's masks against torch_ref given those masks: logits, loss, every gradient. blocks: ops'
    attention by blocks of 8 queries (the path of sequences longer than ATTENTION_BLOCK), the last one padded."""
    idx = tokens(shape)
    x, y = idx[:, :-1], idx[:, 1:]
    ours, ref = models(shape, dtype)
    with small_blocks() if blocks else contextlib.nullcontext():  # the attention masks are drawn block by block
        masks = jax.tree.map(np.asarray, ours.dropout_masks(KEY, *x.shape))
        graphdef, params = nnx.split(ours, nnx.Param)
        logits = np.asarray(jax.jit(lambda p: nnx.merge(graphdef, p)(jnp.asarray(x), rngs=KEY)[0])(params))
        loss, grads = flax_loss_and_grads(ours, jnp.asarray(x), jnp.asarray(y), KEY)
    ours.eval()
    eval_loss = float(ours.loss(jnp.asarray(x), jnp.asarray(y)))
    fp32 = dtype == "float32"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=not fp32):
        ref_logits = ref(torch.from_numpy(x), dropout_masks=masks)[0].float().numpy()
    ref_loss, ref_grads = torch_loss_and_grads(ref, x, y, masks, autocast=not fp32)
    label = f"[{shape}, p={P}{', ' + dtype if not fp32 else ''}{', blocks of 8' if blocks else ''}]"
    what = "flax vs torch_ref, same masks" if fp32 else "flax bf16 vs torch autocast, same masks"
    out = [Measurement(f"dropout logits {what} {label} " + ("max abs" if fp32 else "relative"),
                       max_abs(logits, ref_logits) if fp32 else rel(logits, ref_logits),
                       LOGITS_MAX_ABS if fp32 else BF16_REL),
           Measurement(f"dropout loss {what} {label} relative", abs(loss - ref_loss) / abs(ref_loss),
                       LOSS_REL if fp32 else BF16_REL),
           Measurement(f"dropout gradients {what} {label} worst param relative",
                       max(rel(grads[k], ref_grads[k]) for k in ref_grads), GRAD_REL if fp32 else BF16_REL)]
    if fp32 and not blocks:
        out.append(Measurement(f"dropout changes the loss: train mode vs eval mode {label} relative",
                               abs(loss - eval_loss) / eval_loss, 1.0, DROPOUT_CHANGES_FLOOR))
    return out


def p0_is_the_model_without_dropout(shape: str = "odd") -> Measurement:
    """Bit for bit: p = 0 in train mode with a key, and p > 0 in eval mode, against a model without dropout."""
    idx = jnp.asarray(tokens(shape))
    plain = GPT.from_pretrained(hf_dir(shape))
    p0 = GPT.from_pretrained(hf_dir(shape), dropout=0.0)
    p0.train()
    evaluated = GPT.from_pretrained(hf_dir(shape), dropout=P)  # from_pretrained gives eval mode
    want = np.asarray(plain.loss(idx[:, :-1], idx[:, 1:]))
    worst = max(float(np.abs(np.asarray(m.loss(idx[:, :-1], idx[:, 1:], rngs=KEY)) - want)) for m in (p0, evaluated))
    return Measurement(f"dropout p=0 (train mode) and p={P} (eval mode) vs no dropout [{shape}] loss abs", worst, 0.0)


def mean_over_masks(shape: str = "tiny", draws: int = 200, gelu: str = "exact") -> Measurement:
    """The train-mode loss at fixed weights averaged over `draws` masks on each side, flax's from its keys and
    torch_ref's from torch's own RNG, as nanoGPT's model.py (exact GELU, F.dropout and SDPA dropout_p): their
    difference in standard errors of the difference (a 4-sigma bound: a wrong rate, scale or site moves it by far
    more)."""
    idx = tokens(shape, batch=2, seq_len=25)
    x, y = idx[:, :-1], idx[:, 1:]
    ours, ref = models(shape, gelu=gelu)
    graphdef, params = nnx.split(ours, nnx.Param)
    loss_of = jax.jit(jax.vmap(lambda k: nnx.merge(graphdef, params).loss(jnp.asarray(x), jnp.asarray(y), rngs=k)))
    ours_losses = np.asarray(loss_of(jax.random.split(jax.random.PRNGKey(11), draws)), np.float64)
    torch.manual_seed(0)
    with torch.no_grad():
        ref_losses = np.array([float(ref(torch.from_numpy(x), torch.from_numpy(y))[1]) for _ in range(draws)])
    se = np.sqrt(ours_losses.var(ddof=1) / draws + ref_losses.var(ddof=1) / draws)
    z = abs(ours_losses.mean() - ref_losses.mean()) / se
    return Measurement(f"dropout train-mode loss, mean of {draws} masks each, flax vs torch's own dropout "
                       f"[{shape}, p={P}, {gelu} GELU] difference in standard errors", float(z), DROPOUT_MEAN_SIGMAS)


def all_dropout_checks() -> list[Measurement]:
    """Every dropout measurement, for the report."""
    return [*same_masks("odd"), *same_masks("odd", blocks=True), *same_masks("tiny", "bfloat16"),
            p0_is_the_model_without_dropout(), mean_over_masks()]
