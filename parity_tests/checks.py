"""Parity measurements shared by the tests and `python -m parity_tests.report`.

Each check builds its models from a tiny random HF GPT-2 (see checkpoints.py), measures one
error and returns it with its bound from DESIGN.md. The tests assert `value <= bound`; the
report prints the same numbers.
"""

from __future__ import annotations

import dataclasses
import tempfile
from functools import cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

jax.config.update("jax_default_matmul_precision", "highest")  # no TF32-style shortcuts on GPUs
torch.backends.cuda.matmul.allow_tf32 = False

from flax import nnx  # noqa: E402

import torch_ref  # noqa: E402
from flax_gpt import GPT  # noqa: E402
from flax_gpt.hf import from_hf_state_dict, to_hf_state_dict  # noqa: E402
from parity_tests.checkpoints import SHAPES_BY_NAME, make_hf_model, save_checkpoint  # noqa: E402

# Bounds from DESIGN.md's tolerance table; a bound changes only with a measured reason beside it.
LOGITS_MAX_ABS = 1e-5
LOSS_REL = 1e-6
GRAD_REL = 1e-5
ADAMW_STEP_REL = 1e-6
TRAJECTORY_REL = 1e-4
BF16_REL = 2e-2
BF16_KL = 1e-3


@dataclasses.dataclass(frozen=True)
class Measurement:
    check: str
    value: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.value <= self.bound


@cache
def hf_model(shape: str):
    return make_hf_model(SHAPES_BY_NAME[shape])


_TMP = tempfile.TemporaryDirectory(prefix="parity-")  # removed when the process exits


@cache
def hf_dir(shape: str, layout: str = "safetensors") -> Path:
    return save_checkpoint(hf_model(shape), Path(_TMP.name) / f"{shape}-{layout}", layout)


def tokens(shape: str, batch: int = 3, seq_len: int | None = None, seed: int = 0) -> np.ndarray:
    """Random ids (B, T), T below the block size so position slicing is exercised."""
    s = SHAPES_BY_NAME[shape]
    T = seq_len or s.n_positions - 7
    return np.random.default_rng(seed).integers(0, s.vocab_size, (batch, T), dtype=np.int64)


def rel(a, b) -> float:
    """norm(a - b) / norm(b) in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def hf_logits(shape: str, idx: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(shape)(torch.from_numpy(idx)).logits.numpy()


def flax_logits(model: GPT, idx: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(idx))[0])


# ----------------------------------------------------------------------------- forward


def logits_flax_vs_hf(shape: str, layout: str = "safetensors") -> Measurement:
    idx = tokens(shape)
    model = GPT.from_pretrained(hf_dir(shape, layout))
    return Measurement(f"logits flax vs transformers [{shape}, {layout}] max abs",
                       max_abs(flax_logits(model, idx), hf_logits(shape, idx)), LOGITS_MAX_ABS)


def logits_torch_ref_vs_hf(shape: str) -> Measurement:
    idx = tokens(shape)
    model = torch_ref.GPT.from_pretrained(str(hf_dir(shape))).eval()
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(idx))
    return Measurement(f"logits torch_ref vs transformers [{shape}] max abs",
                       max_abs(logits.numpy(), hf_logits(shape, idx)), LOGITS_MAX_ABS)


def loss_flax_vs_hf(shape: str) -> Measurement:
    """model(idx[:, :-1], idx[:, 1:]) against transformers' own shifted loss with labels=idx."""
    idx = tokens(shape)
    with torch.no_grad():
        ref = float(hf_model(shape)(torch.from_numpy(idx), labels=torch.from_numpy(idx)).loss)
    _, loss = GPT.from_pretrained(hf_dir(shape))(jnp.asarray(idx[:, :-1]), jnp.asarray(idx[:, 1:]))
    return Measurement(f"loss flax vs transformers [{shape}] relative", abs(float(loss) - ref) / abs(ref), LOSS_REL)


def vocab_padding_invariance(shape: str) -> Measurement:
    """Padding wte to a multiple of 64 (or 1, none) must not change logits or loss at all."""
    idx = tokens(shape)
    unpadded = GPT.from_pretrained(hf_dir(shape), vocab_multiple=1)
    padded = GPT.from_pretrained(hf_dir(shape), vocab_multiple=64)
    a = unpadded(jnp.asarray(idx[:, :-1]), jnp.asarray(idx[:, 1:]))
    b = padded(jnp.asarray(idx[:, :-1]), jnp.asarray(idx[:, 1:]))
    diff = max(max_abs(a[0], b[0]), abs(float(a[1]) - float(b[1])))
    return Measurement(f"vocab padding 1 vs 64 [{shape}] logits+loss max abs", diff, 0.0)


def causality(shape: str) -> Measurement:
    """Changing tokens after position t never changes logits at positions <= t."""
    model = GPT.from_pretrained(hf_dir(shape))
    idx = tokens(shape, batch=2)
    T = idx.shape[1]
    worst = 0.0
    for t in (0, T // 2, T - 2):
        changed = idx.copy()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1) % SHAPES_BY_NAME[shape].vocab_size
        worst = max(worst, max_abs(flax_logits(model, idx)[:, : t + 1], flax_logits(model, changed)[:, : t + 1]))
    return Measurement(f"causality [{shape}] earlier-logit change", worst, 0.0)


def causality_by_gradient(shape: str) -> Measurement:
    """d logits[:, t] / d (token embedding at s > t) is exactly zero (nanodo's test)."""
    model = GPT.from_pretrained(hf_dir(shape))
    idx = jnp.asarray(tokens(shape, batch=1, seq_len=12))
    t = 5

    def logit_sum_at_t(x_emb):
        pos = model.wpe.embedding[jnp.arange(idx.shape[1])]
        block_def, block_params = nnx.split(model.h)
        x = x_emb + pos
        x, _ = jax.lax.scan(lambda h, p: (nnx.merge(block_def, p)(h), None), x, block_params)
        return model.lm_head(model.ln_f(x))[:, t].sum()

    grad = jax.grad(logit_sum_at_t)(model.wte(idx))  # (1, T, C)
    return Measurement(f"causality by gradient [{shape}] |d logit_t / d x_s>t|",
                       float(jnp.abs(grad[:, t + 1:]).max()), 0.0)


def jit_vs_eager(shape: str) -> Measurement:
    model = GPT.from_pretrained(hf_dir(shape))
    idx = tokens(shape)
    jitted = nnx.jit(lambda m, x: m(x)[0])(model, jnp.asarray(idx))
    return Measurement(f"jit vs eager logits [{shape}] max abs", max_abs(jitted, flax_logits(model, idx)), LOGITS_MAX_ABS)


# ----------------------------------------------------------------------------- gradients


def flax_grads(model: GPT, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Gradients of the loss as HF-named tensors (unstacked, unpadded), like torch's .grad."""
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(p):
        return nnx.merge(graphdef, p)(jnp.asarray(idx[:, :-1]), jnp.asarray(idx[:, 1:]))[1]

    grads = jax.grad(loss_fn)(params)
    return to_hf_state_dict(nnx.merge(graphdef, grads))


def torch_grads(model: torch_ref.GPT, idx: np.ndarray) -> dict[str, np.ndarray]:
    model.zero_grad()
    _, loss = model(torch.from_numpy(idx[:, :-1]), torch.from_numpy(idx[:, 1:]))
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return {k: np.asarray(v) for k, v in torch_ref.torch_to_hf_state_dict(_with_values(model, grads)).items()}


def _with_values(model: torch_ref.GPT, values: dict[str, torch.Tensor]) -> torch_ref.GPT:
    """A copy of model whose parameters hold `values` (e.g. gradients), for HF-layout export."""
    clone = torch_ref.GPT(model.config)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            p.copy_(values[name])
    return clone


def grads_flax_vs_torch_ref(shape: str) -> Measurement:
    """Worst norm(diff)/norm(ref) over every parameter's gradient, same weights and batch."""
    idx = tokens(shape)
    fg = flax_grads(GPT.from_pretrained(hf_dir(shape)), idx)
    tg = torch_grads(torch_ref.GPT.from_pretrained(str(hf_dir(shape))), idx)
    assert fg.keys() == tg.keys()
    worst = max(rel(fg[k], tg[k]) for k in tg)
    return Measurement(f"gradients flax vs torch_ref [{shape}] worst param relative", worst, GRAD_REL)


def remat_grads(shape: str) -> Measurement:
    """Rematerialised blocks (jax.checkpoint) give the same gradients."""
    idx = tokens(shape)
    plain = flax_grads(GPT.from_pretrained(hf_dir(shape)), idx)
    remat = flax_grads(GPT.from_pretrained(hf_dir(shape), remat=True), idx)
    return Measurement(f"remat vs plain gradients [{shape}] worst relative",
                       max(rel(remat[k], plain[k]) for k in plain), GRAD_REL)


# ----------------------------------------------------------------------------- bf16


def bf16_vs_autocast(shape: str) -> tuple[Measurement, Measurement]:
    """flax bf16 compute against torch_ref under torch.autocast(bfloat16): logits and softmax KL."""
    idx = tokens(shape)
    model = GPT.from_pretrained(hf_dir(shape), dtype="bfloat16")
    ours = flax_logits(model, idx).astype(np.float64)
    ref_model = torch_ref.GPT.from_pretrained(str(hf_dir(shape))).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = ref_model(torch.from_numpy(idx))
    ref = ref.float().numpy().astype(np.float64)
    logp_ref = torch.log_softmax(torch.from_numpy(ref), -1)
    logp_ours = torch.log_softmax(torch.from_numpy(ours), -1)
    kl = float(F.kl_div(logp_ours, logp_ref, log_target=True, reduction="none").sum(-1).mean())
    return (Measurement(f"bf16 logits flax vs torch autocast [{shape}] relative", rel(ours, ref), BF16_REL),
            Measurement(f"bf16 flax vs torch autocast [{shape}] mean KL", kl, BF16_KL))


# ----------------------------------------------------------------------------- weight transfer


def round_trip_flax_torch_flax(shape: str) -> Measurement:
    """flax -> torch_ref -> flax reproduces every parameter bit for bit (padding rows included)."""
    model = GPT.from_pretrained(hf_dir(shape))
    back = torch_ref.torch_to_flax(torch_ref.flax_to_torch(model), model.config)
    a, b = nnx.state(model, nnx.Param), nnx.state(back, nnx.Param)
    worst = max(max_abs(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return Measurement(f"round trip flax -> torch_ref -> flax [{shape}] max abs", worst, 0.0)


def state_dict_round_trip(shape: str) -> Measurement:
    """to_hf_state_dict(from_hf_state_dict(t)) == t for the HF model's own tensors."""
    hf_tensors = {k: v.numpy() for k, v in hf_model(shape).state_dict().items() if k != "lm_head.weight"}
    model = from_hf_state_dict(hf_tensors, GPT.from_pretrained(hf_dir(shape)).config)
    back = to_hf_state_dict(model)
    assert back.keys() == hf_tensors.keys(), sorted(set(back) ^ set(hf_tensors))
    return Measurement(f"HF tensors -> flax -> HF tensors [{shape}] max abs",
                       max(max_abs(back[k], hf_tensors[k]) for k in hf_tensors), 0.0)


def all_forward_checks(shapes=("tiny", "odd", "deep")) -> list[Measurement]:
    """Every forward, gradient, bf16 and transfer measurement, for the report."""
    from parity_tests.checkpoints import GOOD_LAYOUTS

    out = []
    for shape in shapes:
        out += [logits_flax_vs_hf(shape), logits_torch_ref_vs_hf(shape), loss_flax_vs_hf(shape),
                grads_flax_vs_torch_ref(shape), *bf16_vs_autocast(shape), causality(shape),
                causality_by_gradient(shape), vocab_padding_invariance(shape), round_trip_flax_torch_flax(shape),
                state_dict_round_trip(shape), jit_vs_eager(shape), remat_grads(shape)]
    out += [logits_flax_vs_hf("odd", layout) for layout in GOOD_LAYOUTS if layout != "safetensors"]
    return out
