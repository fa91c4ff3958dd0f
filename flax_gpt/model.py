"""GPT-2 in Flax NNX, block for block the model of build-nanogpt's train_gpt2.py.

Module and parameter names follow HuggingFace GPT-2 (wte, wpe, h, ln_1, attn.c_attn, ...),
so `h.attn.c_attn.kernel` is HF's `h.{i}.attn.c_attn.weight` stacked over layers.
The layers are stacked along a leading axis and run through a `lax.scan`: unrolled for training by
default, rolled with `scan_layers=True` (compile time flat in depth) and always when decoding.
Parameters are stored in `param_dtype`; matmuls run in `dtype`; LayerNorm, softmax, the residual
stream, logits and the loss stay in float32.
Dropout (GPTConfig.dropout, nanoGPT's four places) runs in train mode (`model.train()`, the default, as in torch and
nnx) with the masks of a key each call is given (`rngs=`); `model.eval()` turns it off.

The rest of the model path: flax_gpt.ops (the ops with hand-written backward passes, each beside its autodiff
version; `ops.use_autodiff()` runs those instead) and flax_gpt.remat (--remat's train step: GPT.trunk's walk
with its own backward pass, checked against GPT.trunk by tests/test_train_step.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from flax_gpt.config import GPTConfig
from flax_gpt.ops import (attention_keep_mask, causal_attention, cross_entropy, dropout, gelu, gelu_exact, keep_mask,
                          layer_norm, lm_head_loss, masked_attention, matmul, site_key, tied_logits)
from flax_gpt.tiled_attention import tiled_causal_attention

INIT_STD = 0.02


class Linear(nnx.Linear):
    """nnx.Linear (same parameters) whose matmul runs through `matmul`: output in the compute dtype."""

    def __init__(self, *args, matmul_output: str = "float32", **kwargs):
        super().__init__(*args, **kwargs)
        self.matmul_output = matmul_output

    def __call__(self, x):
        y = matmul(x, self.kernel[...], self.dtype, self.matmul_output) + self.bias[...]  # (..., N) float32
        return y.astype(self.dtype)


def _linear(config: GPTConfig, d_in: int, d_out: int, std: float, rngs: nnx.Rngs) -> Linear:
    """A Linear with GPT-2 init: kernel (d_in, d_out) ~ N(0, std), bias zero."""
    return Linear(
        d_in, d_out, dtype=config.dtype, param_dtype=config.param_dtype,
        kernel_init=nnx.initializers.normal(std), rngs=rngs, matmul_output=config.matmul_output,
    )


class LayerNorm(nnx.Module):
    """GPT-2 LayerNorm (eps 1e-5, Flax's default is 1e-6): parameters `scale` and `bias`, output float32."""

    def __init__(self, config: GPTConfig):
        self.scale = nnx.Param(jnp.ones((config.n_embd,), config.param_dtype))
        self.bias = nnx.Param(jnp.zeros((config.n_embd,), config.param_dtype))

    def __call__(self, x):
        return layer_norm(x, self.scale[...], self.bias[...], 1e-5)  # (..., C) float32


class CausalSelfAttention(nnx.Module):
    """Multi-head causal self-attention: c_attn to q, k, v for all heads, attention, c_proj."""

    def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
        C = config.n_embd
        proj_std = INIT_STD / math.sqrt(2 * config.n_layer)  # residual projections scaled down
        self.c_attn = _linear(config, C, 3 * C, INIT_STD, rngs)  # q, k, v for all heads
        self.c_proj = _linear(config, C, C, proj_std, rngs)
        self.n_head = config.n_head
        self.implementation = config.attention
        self.dropout = config.dropout

    def __call__(self, x, kv_cache=None, pos=0, dropout_key=None):
        """x (B, T, C) -> (B, T, C); with kv_cache=(k, v), each (B, S, nh, hs), x sits at positions
        pos..pos+T-1: its keys and values are written there and it attends to all cached ones. With a dropout key
        (no cache): dropout on the attention probabilities and on the output."""
        B, T, C = x.shape
        qkv = self.c_attn(x)  # (B, T, 3C)
        q, k, v = jnp.split(qkv, 3, axis=-1)  # each (B, T, C)
        q = q.reshape(B, T, self.n_head, C // self.n_head)  # (B, T, nh, hs)
        k = k.reshape(B, T, self.n_head, C // self.n_head)  # (B, T, nh, hs)
        v = v.reshape(B, T, self.n_head, C // self.n_head)  # (B, T, nh, hs)
        if kv_cache is not None:  # write this step's keys and values at pos..pos+T-1
            k_cache, v_cache = kv_cache  # (B, S, nh, hs) each
            kv_cache = (jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), pos, axis=1),
                        jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), pos, axis=1))
        if kv_cache is None or (isinstance(pos, int) and pos == 0):  # the sequence from its start (training, prefill)
            y = self.causal(q, k, v, site_key(dropout_key, 0))  # (B, T, nh, hs)
        else:  # decoding: attend to every cached position up to this one
            k, v = kv_cache  # (B, S, nh, hs) each
            visible = jnp.arange(k.shape[1])[None, :] <= pos + jnp.arange(T)[:, None]  # (T, S)
            y = masked_attention(q, k, v, visible)  # (B, T, nh, hs)
        y = y.reshape(B, T, C)  # (B, T, C) heads side by side
        return dropout(self.c_proj(y), self.dropout, site_key(dropout_key, 1)), kv_cache  # (B, T, C)

    def causal(self, q, k, v, dropout_key=None):
        """Causal attention of q, k, v (B, T, nh, hs): cuDNN's flash attention (keeps only its output and row
        statistics for the backward pass), tiled attention (for CPUs, flax_gpt.tiled_attention; float16 goes to
        XLA's), or XLA's by blocks of queries, recomputed in the backward pass. Dropout on the probabilities is XLA's:
        JAX's cuDNN attention fixes its dropout seed when it compiles, so every step would drop the same entries, and
        not those of the run's key."""
        if dropout_key is not None:
            if self.implementation == "cudnn":
                raise ValueError("GPTConfig.attention 'cudnn' cannot apply dropout with the run's masks (JAX's cuDNN "
                                 "attention fixes its seed when compiled): use attention='xla'")
            return causal_attention(q, k, v, self.dropout, dropout_key)  # (B, T, nh, hs)
        if self.implementation == "cudnn":
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")  # (B, T, nh, hs)
        if self.implementation == "tiled" and q.dtype != jnp.float16:
            return tiled_causal_attention(q, k, v)  # (B, T, nh, hs)
        return causal_attention(q, k, v)  # (B, T, nh, hs)


class MLP(nnx.Module):
    """c_fc to 4C, config.gelu's GELU (GPT-2's tanh approximation or nanoGPT's exact erf), c_proj back to C."""

    def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
        C = config.n_embd
        proj_std = INIT_STD / math.sqrt(2 * config.n_layer)
        self.c_fc = _linear(config, C, 4 * C, INIT_STD, rngs)
        self.c_proj = _linear(config, 4 * C, C, proj_std, rngs)
        self.exact_gelu = config.gelu == "exact"
        self.dropout = config.dropout

    def __call__(self, x, dropout_key=None):
        x = self.c_fc(x)  # (B, T, 4C)
        x = gelu_exact(x) if self.exact_gelu else gelu(x)  # (B, T, 4C)
        return dropout(self.c_proj(x), self.dropout, dropout_key)  # (B, T, C)


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig, rngs: nnx.Rngs):
        self.ln_1 = LayerNorm(config)
        self.attn = CausalSelfAttention(config, rngs)
        self.ln_2 = LayerNorm(config)
        self.mlp = MLP(config, rngs)

    def __call__(self, x, kv_cache=None, pos=0, dropout_key=None):
        y, kv_cache = self.attn(self.ln_1(x), kv_cache, pos, site_key(dropout_key, 0))  # (B, T, C)
        x = x + y  # (B, T, C) float32 residual stream
        x = x + self.mlp(self.ln_2(x), site_key(dropout_key, 1))  # (B, T, C)
        return x, kv_cache


class GPT(nnx.Module):
    """GPT-2 language model: `logits, loss = model(idx, targets=None)`; with dropout, in train mode,
    `model(idx, targets, rngs=nnx.Rngs(dropout=seed))` (a fresh key from the rngs each call)."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs | None = None, seed: int = 0):
        rngs = rngs if rngs is not None else nnx.Rngs(seed)
        self.config = config
        V, Vp, C = config.vocab_size, config.padded_vocab_size, config.n_embd
        self.wte = nnx.Embed(Vp, C, param_dtype=config.param_dtype, rngs=rngs,
                             embedding_init=_padded_normal_init(V))  # rows >= V stay zero
        self.wpe = nnx.Embed(config.block_size, C, param_dtype=config.param_dtype, rngs=rngs,
                             embedding_init=nnx.initializers.normal(INIT_STD))

        @nnx.split_rngs(splits=config.n_layer)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(config, rngs)

        self.h = make_blocks(rngs)  # one Block whose parameters have a leading n_layer axis
        self.ln_f = LayerNorm(config)
        self.deterministic = False  # train mode, as a torch or nnx module starts: model.eval() sets True

    def __call__(self, idx, targets=None, *, rngs=None):
        x, _ = self.trunk(idx, dropout_key=self.dropout_key(rngs))  # (B, T, C)
        logits = self.padded_logits(x)  # (B, T, Vp) float32, -inf in the padding columns
        loss = None if targets is None else cross_entropy(logits, targets)  # () float32
        return logits[..., : self.config.vocab_size], loss  # (B, T, V)

    def loss(self, idx, targets, *, rngs=None, grad_scale=None):
        """Mean cross entropy of idx (B, T) against targets (B, T) without materializing the logits. grad_scale: the
        cotangent its gradient will be taken with (float16's loss scale; see ops.lm_head_loss)."""
        x, _ = self.trunk(idx, dropout_key=self.dropout_key(rngs))  # (B, T, C)
        c = self.config
        return lm_head_loss(x, self.wte.embedding[...], targets, c.vocab_size, c.dtype, c.matmul_output, grad_scale)

    def decode(self, idx, kv_cache, pos):
        """Logits (B, T, V) of idx (B, T) at positions pos..pos+T-1, reading and extending kv_cache."""
        x, kv_cache = self.trunk(idx, kv_cache, pos)  # (B, T, C)
        return self.lm_head(x), kv_cache  # (B, T, V)

    def init_kv_cache(self, batch: int, length: int):
        """Empty keys and values for `length` positions: two (n_layer, B, S, nh, hs) arrays."""
        c = self.config
        shape = (c.n_layer, batch, length, c.n_head, c.head_dim)
        return jnp.zeros(shape, c.dtype), jnp.zeros(shape, c.dtype)

    def trunk(self, idx, kv_cache=None, pos=0, dropout_key=None):
        """Embeddings, the blocks and ln_f: (B, T) -> (B, T, C), and the updated cache; with a dropout key, the masks
        drawn from it (see dropout_masks)."""
        x = dropout(self.embed(idx, pos), self.config.dropout, site_key(dropout_key, 0))  # (B, T, C)
        return self.blocks(x, kv_cache, pos, self.layer_keys(dropout_key))

    def dropout_key(self, rngs):
        """This call's dropout key: None in eval mode or without dropout, else a fresh key from rngs (an nnx.Rngs: its
        dropout stream) or rngs itself (a key)."""
        if self.deterministic or self.config.dropout == 0:
            return None
        if rngs is None:
            raise ValueError(f"GPT in train mode with dropout {self.config.dropout} draws its masks from a key: pass "
                             "rngs=nnx.Rngs(dropout=seed) (or a key), or call model.eval()")
        return rngs.dropout() if isinstance(rngs, nnx.Rngs) else rngs

    def layer_keys(self, dropout_key):
        """The blocks' dropout keys, (n_layer, ...) split from the trunk's key; None without one."""
        return None if dropout_key is None else jax.random.split(site_key(dropout_key, 1), self.config.n_layer)

    def dropout_masks(self, dropout_key, batch: int, length: int) -> dict:
        """The masks (True: kept) that a (batch, length) forward pass with this dropout key applies: "embd" (B, T, C),
        and per layer "attn" (B, nh, T, T), "attn_proj" and "mlp" (B, T, C): what torch_ref takes to drop the same."""
        c, p = self.config, self.config.dropout
        shape = (batch, length, c.n_embd)
        masks = {"embd": keep_mask(site_key(dropout_key, 0), p, shape), "attn": [], "attn_proj": [], "mlp": []}
        for key in self.layer_keys(dropout_key):
            attn_key = site_key(key, 0)
            masks["attn"].append(attention_keep_mask(site_key(attn_key, 0), p, (batch, c.n_head, length, length)))
            masks["attn_proj"].append(keep_mask(site_key(attn_key, 1), p, shape))
            masks["mlp"].append(keep_mask(site_key(key, 1), p, shape))
        return masks

    def embed(self, idx, pos=0):
        """Token plus position embeddings of idx (B, T) at positions pos..pos+T-1: (B, T, C)."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        return self.wte(idx) + self.wpe(pos + jnp.arange(T))  # (B, T, C) float32

    def blocks(self, x, kv_cache=None, pos=0, layer_keys=None):
        """The transformer blocks over the stacked layer axis, then ln_f: (B, T, C) -> (B, T, C)."""
        block_def, block_params = nnx.split(self.h)  # params carry a leading n_layer axis

        def run_block(x, layer):
            params, cache, key = layer  # one layer's parameters, (k, v) cache or None, dropout key or None
            y, cache = nnx.merge(block_def, params)(x, cache, pos, key)  # (B, T, C), updated cache
            return y, cache

        if self.config.remat:  # for autodiff of GPT.loss; train steps run flax_gpt.remat's walk and backward pass
            run_block = jax.checkpoint(run_block)  # recompute activations in the backward pass
        # Training unrolls (the rolled loop's stacking copies cost ~1/3 of a bf16 step on CPU). Decoding keeps the
        # rolled loop, which updates the stacked KV cache in place; so does remat: in unrolled code XLA computes the
        # recomputation next to the forward pass and keeps its results, saving nothing.
        rolled = self.config.scan_layers or self.config.remat or kv_cache is not None
        unroll = 1 if rolled else True
        x, kv_cache = jax.lax.scan(run_block, x, (block_params, kv_cache, layer_keys), unroll=unroll)  # (B, T, C)
        return self.ln_f(x), kv_cache  # (B, T, C) float32

    def lm_head(self, x):
        """Logits over the true vocabulary from the tied token embedding: (B, T, C) -> (B, T, V) float32."""
        return self.padded_logits(x)[..., : self.config.vocab_size]

    def padded_logits(self, x):
        """Logits over all Vp rows of wte, -inf in the padding columns: (B, T, C) -> (B, T, Vp) float32. A multiple
        of 64 rows is what the kernels are fast at (lm_head + loss on CPU, bf16: 1263 -> 827 ms); -inf drops out of every softmax."""
        c = self.config
        return tied_logits(x, self.wte.embedding[...], c.vocab_size, c.dtype, c.matmul_output)  # (B, T, Vp)

    @classmethod
    def from_pretrained(cls, name_or_path: str, **overrides) -> "GPT":
        """GPT-2 weights from an HF hub id (gpt2 ... gpt2-xl) or a local HF directory, in eval mode (as transformers
        gives them)."""
        from flax_gpt import hf  # here, not at the top: hf imports GPT from this module (a cycle)

        model = hf.load_pretrained(name_or_path, **overrides)
        model.eval()
        return model

    def save_pretrained(self, out_dir: str) -> None:
        """Write an HF GPT-2 directory (config.json, model.safetensors) that transformers loads."""
        from flax_gpt import export  # here, not at the top: export imports GPT from this module (a cycle)

        export.save_pretrained(self, out_dir)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; like nanoGPT, position embeddings are left out by default."""
        n = sum(p.size for p in jax.tree.leaves(nnx.state(self, nnx.Param)))
        return n - self.wpe.embedding.size if non_embedding else n


def _padded_normal_init(n_real_rows: int):
    """N(0, 0.02) for the first n_real_rows rows, zeros for the vocabulary padding."""
    normal = nnx.initializers.normal(INIT_STD)

    def init(key, shape, dtype=jnp.float32):
        table = normal(key, shape, dtype)  # (Vp, C)
        keep = (jnp.arange(shape[0]) < n_real_rows)[:, None]  # (Vp, 1)
        return jnp.where(keep, table, 0).astype(dtype)

    return init
