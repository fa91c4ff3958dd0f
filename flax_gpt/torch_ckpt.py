"""build-nanogpt and nanoGPT checkpoints (.pt) <-> flax_gpt.GPT; torch is imported here, lazily, and only here.

    build-nanogpt  log/model_XXXXX.pt: {'model', 'config' (a pickled GPTConfig), 'step', 'val_loss'}
    nanoGPT        out/ckpt.pt: {'model' ('_orig_mod.' keys under torch.compile), 'optimizer', 'model_args',
                   'iter_num', 'best_val_loss', 'config'}

Reading: a file is recognised by its keys. torch.load(weights_only=True) reads it, so nothing in it can run code;
a pickled `<any module>.GPTConfig` is read as data (a stand-in class, registered under that name, keeps its
fields). The weights move in: nn.Linear (out, in) weights are transposed, lm_head.weight must equal wte
(tied), a vocabulary of 50304 (GPT-2's 50257 padded) becomes 50257. Each model computes what its model.py does:
nanoGPT's with the exact (erf) GELU and model_args' dropout, build-nanogpt's with GPT-2's tanh GELU, no dropout.
Writing: the same dicts (nn.Linear layout, lm_head.weight tied to wte, the true vocabulary; nanoGPT's dropout).
build-nanogpt's config is pickled as `__main__.GPTConfig`, as its train_gpt2.py writes it. nanoGPT's optimizer is
a torch.optim.AdamW state dict with nanoGPT's two parameter groups, holding a training run's AdamW moments.
Neither file can name a GELU, so a model of the other GELU is written all the same (its weights are what a user
moves) and gelu_note says what their model.py then computes differently: logits ~1e-3 apart (docs/interop.md).
"""

from __future__ import annotations

import pickle
import pickletools
import types
import zipfile
from pathlib import Path

import numpy as np

from flax_gpt.config import GPTConfig
from flax_gpt.errors import UserError, first_line
from flax_gpt.hf import CheckpointError, from_hf_state_dict, to_hf_state_dict
from flax_gpt.model import GPT
from flax_gpt.optim import OptimConfig

FORMATS = ("build-nanogpt", "nanogpt")
GPT2_VOCAB, GPT2_PADDED_VOCAB = 50257, 50304  # both originals train GPT-2 with its vocabulary padded to 50304
SHAPE_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")
LINEAR_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # (out, in)
_BLOCK_PARAMS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                 "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                 "mlp.c_proj.weight", "mlp.c_proj.bias")


class GPTConfigRecord:
    """A pickled GPTConfig as plain attributes: read from `<any module>.GPTConfig`, written as `__main__.GPTConfig`."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"GPTConfig state is a {type(state).__name__}, not a dict of fields")
        self.__dict__.update(state)


def require_torch():
    """The torch module; without it a UserError that says how to install it."""
    try:
        import torch
    except ImportError:
        raise UserError("reading or writing a .pt checkpoint needs torch: pip install 'flax-gpt[torch]'") from None
    return torch


# ----------------------------------------------------------------------------- reading


def read(path: Path) -> dict:
    """The checkpoint dict in path, read by torch.load(weights_only=True); a pickled GPTConfig becomes a dict."""
    torch = require_torch()
    configs = [type("GPTConfig", (GPTConfigRecord,), {"__module__": module})
               for module, name in _pickled_globals(path) if name == "GPTConfig"]
    try:
        with torch.serialization.safe_globals(configs):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused, it pickles more than tensors and plain values ({first_line(e)}); "
                              "nothing in it was run. Re-save the checkpoint's tensors and config alone") from None
    except Exception as e:  # zip, storage and EOF errors have no common base
        raise CheckpointError(f"{path}: cannot read it ({first_line(e)}); the file is truncated or corrupt") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), GPTConfigRecord):
        ckpt["config"] = dict(vars(ckpt["config"]))
    return ckpt


def _pickled_globals(path: Path) -> set[tuple[str, str]]:
    """(module, name) of every global the pickle of a torch.save zip names; parsed, never run."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise CheckpointError(f"{path}: a zip file, but not one torch.save wrote (no data.pkl)")
            data = archive.read(pickles[0])
        return {tuple(arg.split(" ", 1)) for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path}: not a torch.save file, or truncated ({first_line(e)}); re-save it with "
                              "torch.save (torch >= 1.6) or copy it again") from None


def load(path: Path, **numerics) -> GPT:
    """The GPT in a build-nanogpt or nanoGPT checkpoint; numerics as in load.load_model (dtype, remat, ...)."""
    ckpt = read(path)
    fmt, fields = _model_fields(ckpt, path)
    config = _config(fmt, fields, path, **numerics)
    return from_hf_state_dict(_hf_tensors(ckpt["model"], config, path), config)


def _model_fields(ckpt, path: Path) -> tuple[str, dict]:
    """(format, the model's config fields): nanoGPT's model_args, or build-nanogpt's pickled GPTConfig."""
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        if isinstance(ckpt.get("model_args"), dict):
            return "nanogpt", ckpt["model_args"]
        if isinstance(ckpt.get("config"), dict) and "n_layer" in ckpt["config"]:
            return "build-nanogpt", ckpt["config"]
    keys = ", ".join(map(repr, list(ckpt)[:6])) if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
    raise CheckpointError(f"{path}: neither a build-nanogpt checkpoint ('model' + 'config') nor a nanoGPT one "
                          f"('model' + 'model_args'); it holds {keys}")


def _config(fmt: str, fields: dict, path: Path, **numerics) -> GPTConfig:
    if fields.get("bias", True) is not True:
        raise CheckpointError(f"{path}: a nanoGPT model with bias={fields['bias']!r}; flax_gpt's GPT-2 has a bias in "
                              "every Linear and LayerNorm, so it cannot hold it (train with bias=True to move here)")
    if missing := [k for k in SHAPE_FIELDS if k not in fields]:
        raise CheckpointError(f"{path}: the model config has no {', '.join(missing)}")
    shape = {k: fields[k] for k in SHAPE_FIELDS}
    if shape["vocab_size"] == GPT2_PADDED_VOCAB:
        shape["vocab_size"] = GPT2_VOCAB  # the padding rows are never a target; our logits stop at 50257
    if fmt == "nanogpt":  # its model.py: nn.GELU() (erf), nn.Dropout(model_args' dropout)
        dropout = fields.get("dropout", 0.0)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise CheckpointError(f"{path}: model_args' dropout is {dropout!r}, not a number")
        shape.update(gelu="exact", dropout=float(dropout))
    try:
        return GPTConfig(**{**shape, **numerics})
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _hf_tensors(state: dict, config: GPTConfig, path: Path) -> dict[str, np.ndarray]:
    """HF-layout float32 arrays (Conv1D (in, out), true vocabulary) of a torch state dict."""
    torch = require_torch()
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    if bad := [k for k, v in state.items() if not isinstance(v, torch.Tensor)]:
        raise CheckpointError(f"{path}: 'model' holds non-tensors ({', '.join(bad[:3])})")
    head, wte = state.pop("lm_head.weight", None), state.get("transformer.wte.weight")
    if head is not None and wte is not None and not torch.equal(head, wte):
        raise CheckpointError(f"{path}: lm_head.weight differs from transformer.wte.weight; this GPT-2 ties them")
    if wte is not None and wte.shape[0] == GPT2_PADDED_VOCAB and config.vocab_size == GPT2_VOCAB:
        state["transformer.wte.weight"] = wte[:GPT2_VOCAB]  # (50257, C)
    return {k: (v.t() if k.endswith(LINEAR_WEIGHTS) else v).float().numpy() for k, v in state.items()}


# ----------------------------------------------------------------------------- writing


def torch_names(n_layer: int) -> list[str]:
    """The originals' named_parameters() order (their optimizer's order); the tied lm_head is wte."""
    blocks = [f"transformer.h.{i}.{name}" for i in range(n_layer) for name in _BLOCK_PARAMS]
    return ["transformer.wte.weight", "transformer.wpe.weight", *blocks, "transformer.ln_f.weight",
            "transformer.ln_f.bias"]


def torch_state_dict(model: GPT) -> dict:
    """The originals' state dict of model: nn.Linear (out, in) weights, lm_head.weight the same tensor as wte."""
    tensors = _torch_tensors(model)
    return {**tensors, "lm_head.weight": tensors["transformer.wte.weight"]}


def _torch_tensors(model: GPT) -> dict:
    """The parameters of model (or AdamW moments shaped like them) as torch tensors, in torch_names order."""
    torch = require_torch()
    hf = to_hf_state_dict(model)  # 'transformer.' keys, Conv1D (in, out), unpadded wte
    return {k: torch.from_numpy(np.array(hf[k].T if k.endswith(LINEAR_WEIGHTS) else hf[k], order="C"))  # copies
            for k in torch_names(model.config.n_layer)}


# The GELU each format's model.py computes: what a model of the other one changes there (gelu_note)
FORMAT_GELU = {"build-nanogpt": "tanh", "nanogpt": "exact"}
_GELU_NAMES = {"tanh": "GPT-2's tanh GELU", "exact": "the exact (erf) GELU"}


def gelu_note(config: GPTConfig, fmt: str) -> str | None:
    """One line saying that fmt's model.py computes another GELU than config's, or None where they agree."""
    theirs = FORMAT_GELU[fmt]
    if config.gelu == theirs:
        return None
    script = "build-nanogpt's train_gpt2.py" if fmt == "build-nanogpt" else "nanoGPT's model.py"
    return (f"note: {script} computes {_GELU_NAMES[theirs]}, this model {_GELU_NAMES[config.gelu]}: the same weights "
            "give logits ~1e-3 apart there (docs/interop.md)")


def build_nanogpt_checkpoint(model: GPT, step: int = 0, val_loss: float | None = None) -> dict:
    """What build-nanogpt's train_gpt2.py saves: its GPT(ckpt['config']).load_state_dict(ckpt['model']) loads it
    (with GPT-2's tanh GELU: gelu_note says so for an exact-GELU model)."""
    c = model.config
    config = GPTConfigRecord(block_size=c.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                             n_embd=c.n_embd)
    return {"model": torch_state_dict(model), "config": config, "step": step, "val_loss": val_loss}


def nanogpt_checkpoint(model: GPT, iter_num: int = 0, best_val_loss: float = 1e9, optim: OptimConfig | None = None,
                       adam: tuple[GPT, GPT, int] | None = None) -> dict:
    """What nanoGPT's train.py saves, for its sample.py and `train.py --init_from=resume`: model_args carry
    config.dropout; its model.py computes the exact GELU (gelu_note says so for a tanh-GELU model).

    adam: the run's AdamW moments (mu, nu as GPTs of model's shape) and update count; without it the optimizer
    state is empty and nanoGPT's AdamW starts afresh. optim: the run's AdamW settings (default OptimConfig()).
    """
    optim = optim or OptimConfig()
    c = model.config
    model_args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size, bias=True,
                      vocab_size=c.vocab_size, dropout=c.dropout)
    state = torch_state_dict(model)
    # the run's settings under nanoGPT's flag names, for the record (its train.py reads its own flags)
    config = {**model_args, "learning_rate": optim.lr, "min_lr": optim.lr * optim.min_lr_ratio,
              "warmup_iters": optim.warmup_steps, "lr_decay_iters": optim.max_steps, "max_iters": optim.max_steps,
              "weight_decay": optim.weight_decay, "beta1": optim.beta1, "beta2": optim.beta2,
              "grad_clip": optim.grad_clip, "init_from": "resume"}
    return {"model": state, "optimizer": adamw_state_dict(state, optim, adam), "model_args": model_args,
            "iter_num": iter_num, "best_val_loss": best_val_loss, "config": config}


def adamw_state_dict(state: dict, optim: OptimConfig, adam: tuple[GPT, GPT, int] | None = None) -> dict:
    """torch.optim.AdamW(...).state_dict() of nanoGPT's configure_optimizers over state's parameters.

    Group 0 decays the tensors of 2 or more dims, group 1 the rest not (optax's decay_mask); exp_avg / exp_avg_sq /
    step are optax's mu / nu / count, which torch's AdamW uses in the same update.
    """
    torch = require_torch()
    params = {k: torch.nn.Parameter(v, requires_grad=False) for k, v in state.items() if k != "lm_head.weight"}
    groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    if adam is not None:
        mu, nu, count = adam
        exp_avg, exp_avg_sq = _torch_tensors(mu), _torch_tensors(nu)
        for name, p in params.items():
            optimizer.state[p] = {"step": torch.tensor(float(count)), "exp_avg": exp_avg[name],
                                  "exp_avg_sq": exp_avg_sq[name]}
    return optimizer.state_dict()


def save(ckpt: dict, file) -> None:
    """torch.save(ckpt, file), a GPTConfigRecord pickled as `__main__.GPTConfig` (build-nanogpt's class)."""
    torch = require_torch()
    torch.save(ckpt, file, pickle_module=_PICKLE)


class _Pickler(pickle._Pickler):  # the Python pickler: its save_global can name a class another way
    def save_global(self, obj, name=None):
        if obj is GPTConfigRecord:
            self.write(pickle.GLOBAL + b"__main__\nGPTConfig\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


_PICKLE = types.SimpleNamespace(__name__="pickle", Pickler=_Pickler)
