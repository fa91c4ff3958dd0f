"""The training loss and its gradients with every block recomputed in the backward pass (--remat), the
backward pass written out, so that what exists when is chosen here rather than by XLA's scheduler.

Its forward pass walks the model as GPT.trunk does (GPT.embed, the blocks of GPT.h, GPT.ln_f; no KV cache), keeping
each block's input: tests/test_train_step.py fails when the two walks diverge. Autodiff of GPT.loss with remat
(GPT.blocks: a scan of jax.checkpoint blocks) gives the same gradients, but XLA:CPU creates the zero-filled buffers
its backward pass accumulates into (the (n_layer, ...) stacked block gradients, wte's) when the step starts: they
sit through the forward pass beside its activations, 0.46 GiB of gpt2's 1.27 GiB at 8x1024 in bf16 (measured on
CPU: BENCHMARKS.md, the --remat entry). Here:

    forward     embeddings, the blocks keeping only each block's input, ln_f, the loss and its gradient
                with respect to ln_f's output (ops.lm_head_loss_and_dx), chunk by chunk
    backward    block by block from the last: recompute the block from its input, take its gradients,
                write them into the stacked gradients (created only once the backward pass has begun)
    embeddings  wte's gradient from the lm_head, its logits recomputed chunk by chunk once the blocks are done
                (one lm_head matmul more; up to ops.FULL_LOGITS_TOKENS the full logits' gradient is kept
                instead), then the token and position embeddings' rows added
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flax_gpt import ops
from flax_gpt.model import GPT


def _block(block_def: nnx.GraphDef, params: nnx.State, x, dropout_key=None):
    """One block of GPT.h, as GPT.blocks calls it without a cache: (B, T, C) -> (B, T, C)."""
    return nnx.merge(block_def, params)(x, None, 0, dropout_key)[0]  # (B, T, C)


def trunk(model: GPT, idx, dropout_key=None):
    """GPT.trunk(idx, dropout_key=...)[0], ln_f's output (B, T, C), with what the backward pass needs: ln_f's vjp, each
    block's input (n_layer, B, T, C) and the blocks' dropout keys (None without dropout)."""
    block_def, block_params = nnx.split(model.h)  # parameters with a leading n_layer axis
    ln_f_def, ln_f_params = nnx.split(model.ln_f)
    layer_keys = model.layer_keys(dropout_key)  # (L, ...) or None
    x = ops.dropout(model.embed(idx), model.config.dropout, ops.site_key(dropout_key, 0))  # (B, T, C) float32

    def forward(x, layer):
        params, key = layer
        return _block(block_def, params, x, key), x

    x, inputs = jax.lax.scan(forward, x, (block_params, layer_keys))  # (B, T, C), (L, B, T, C)
    h, ln_f_vjp = jax.vjp(lambda x, p: nnx.merge(ln_f_def, p)(x), x, ln_f_params)  # (B, T, C)
    return h, ln_f_vjp, inputs, layer_keys


def loss_and_grads(params: nnx.State, graphdef: nnx.GraphDef, idx, targets, dropout_key=None, grad_scale=None):
    """(mean cross entropy, gradients shaped like params) of one (B, T) batch, blocks recomputed (and their dropout
    masks, from the same keys); the gradients times grad_scale when one is given (float16's loss scale)."""
    model = nnx.merge(graphdef, params)
    c = model.config
    block_def, block_params = nnx.split(model.h)  # parameters with a leading n_layer axis
    wte = model.wte.embedding[...]  # (Vp, C)
    head = (c.vocab_size, c.dtype, c.matmul_output)

    h, ln_f_vjp, inputs, layer_keys = trunk(model, idx, dropout_key)  # (B, T, C), ln_f's vjp, (L, B, T, C), keys
    defer = ops.loss_in_chunks(targets.size)  # else the logits are small: keep their weight gradient
    if defer:
        loss, dh = ops.lm_head_loss_and_dx(h, wte, targets, *head, grad_scale)  # (), (B, T, C)
    else:
        loss, head_vjp = jax.vjp(lambda h, w: ops.lm_head_loss(h, w, targets, *head), h, wte)
        dh, d_wte = head_vjp(jnp.ones((), jnp.float32) if grad_scale is None else grad_scale)  # (B, T, C), (Vp, C)
    dx, d_ln_f = ln_f_vjp(dh)  # (B, T, C), ln_f's gradients

    def backward(i, carry):
        dx, d_blocks = carry  # (B, T, C), stacked gradients
        layer = c.n_layer - 1 - i
        params = jax.tree.map(lambda p: p[layer], block_params)
        key = None if layer_keys is None else layer_keys[layer]
        _, block_vjp = jax.vjp(lambda p, x: _block(block_def, p, x, key), params, inputs[layer])
        d_params, dx = block_vjp(dx)  # one layer's gradients, (B, T, C)
        d_blocks = jax.tree.map(lambda d, g: d.at[layer].set(g), d_blocks, d_params)
        return dx, d_blocks

    d_blocks = ops.after(dx, jax.tree.map(jnp.zeros_like, block_params))[0]  # created once dx exists
    dx, d_blocks = jax.lax.fori_loop(0, c.n_layer, backward, (dx, d_blocks))  # dx: (B, T, C) after the embeddings
    dx = ops.dropout(dx, c.dropout, ops.site_key(dropout_key, 0))  # (B, T, C) at the embeddings: dropout is its own vjp
    if defer:
        d_wte = ops.add_lm_head_dw(*ops.after(dx, jnp.zeros(wte.shape, jnp.float32), h, wte, targets), *head,
                                   grad_scale)
    d_wte = d_wte.at[idx].add(dx)  # (Vp, C): the token embedding's rows
    T = idx.shape[1]
    d_wpe = jnp.zeros(model.wpe.embedding.shape, jnp.float32).at[:T].set(dx.sum(0))  # (block_size, C)

    grads = nnx.merge(graphdef, jax.tree.map(lambda p: p, params))  # new variables, then set to the gradients
    nnx.update(grads.h, d_blocks)
    nnx.update(grads.ln_f, d_ln_f)
    grads.wte.embedding[...] = d_wte.astype(wte.dtype)
    grads.wpe.embedding[...] = d_wpe.astype(grads.wpe.embedding.dtype)
    return loss, nnx.state(grads, nnx.Param)
