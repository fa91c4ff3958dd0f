"""Tiny random HF GPT-2 checkpoints, built offline with transformers, in every file layout.

Shapes are small enough that a whole parity test runs in a fraction of a second, and odd
enough to catch shape bugs (n_head not a power of two, vocab not a multiple of 64).
Biases and LayerNorm parameters are perturbed away from their init (zeros / ones), so a
loader that drops or misplaces them changes the logits; weight matrices are scaled up so that
logits are O(1) and numeric traps (erf GELU, attention scale, LayerNorm eps) exceed the bounds.

Layouts (what lands in the directory):

  good
    safetensors          save_pretrained(): config.json, generation_config.json,
                         model.safetensors ('transformer.' keys, no lm_head.weight)
    bin                  config.json + pytorch_model.bin = torch.save(state_dict()), which
                         includes the tied lm_head.weight ('transformer.' keys)
    sharded-safetensors  save_pretrained(max_shard_size=...): model-0000i-of-0000n.safetensors
                         + model.safetensors.index.json
    sharded-bin          pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json
                         (written here: transformers 5 always writes safetensors)
    no-prefix            model.safetensors with keys 'wte.weight', 'h.0...' (the hub 'gpt2' file)
    with-buffers         no-prefix keys plus the old buffers h.{i}.attn.bias (1, 1, T, T) tril
                         and h.{i}.attn.masked_bias () = -1e4, no lm_head.weight
  bad (each a single model.safetensors + config.json unless said)
    missing-key          transformer.h.0.mlp.c_fc.bias removed
    wrong-shape          transformer.h.0.mlp.c_fc.weight stored (4C, C), nn.Linear layout
    truncated            model.safetensors cut to half its bytes
    unexpected-key       an extra transformer.h.0.attn.extra.weight (C, C)
    no-config            model.safetensors alone, no config.json

The originals' own checkpoint files (one .pt each, see save_build_nanogpt / save_nanogpt):

  build-nanogpt        {'model': state_dict(), 'config': GPTConfig(...), 'step', 'val_loss'}, the GPTConfig
                       dataclass of a module that is gone when the file is read (train_gpt2.py's __main__)
  nanogpt              {'model' ('_orig_mod.' keys, as under torch.compile), 'optimizer', 'model_args',
                       'iter_num', 'best_val_loss' (a tensor), 'config'}
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch

GOOD_LAYOUTS = ("safetensors", "bin", "sharded-safetensors", "sharded-bin", "no-prefix", "with-buffers")
BAD_LAYOUTS = ("missing-key", "wrong-shape", "truncated", "unexpected-key", "no-config")
LAYOUTS = GOOD_LAYOUTS + BAD_LAYOUTS
N_SHARDS = 3  # sharded layouts aim at this many files
WEIGHT_SCALE = 5.0  # perturbed models: matrices x5 (std 0.1, like trained GPT-2), see make_hf_model


@dataclass(frozen=True)
class Shape:
    name: str
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    vocab_size: int


SHAPES = (
    Shape("tiny", n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=128),
    Shape("odd", n_layer=3, n_head=3, n_embd=48, n_positions=40, vocab_size=101),  # 3 heads, vocab % 64 != 0
    Shape("deep", n_layer=4, n_head=4, n_embd=64, n_positions=32, vocab_size=97),
)
PADDED = Shape("padded", n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50304)  # the originals' vocab
SHAPES_BY_NAME = {s.name: s for s in (*SHAPES, PADDED)}


def hf_config(shape: Shape | str):
    """A GPT2Config of the shape: GPT-2's tanh GELU, no dropout."""
    from transformers import GPT2Config

    shape = SHAPES_BY_NAME[shape] if isinstance(shape, str) else shape
    return GPT2Config(
        n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd,
        n_positions=shape.n_positions, vocab_size=shape.vocab_size,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=shape.vocab_size - 1, eos_token_id=shape.vocab_size - 1,  # inside the tiny vocab
    )


def make_hf_model(shape: Shape | str, seed: int = 0, perturb: bool = True):
    """A random GPT2LMHeadModel in eval mode.

    With perturb: every weight matrix is scaled by WEIGHT_SCALE, every bias (LayerNorm's too)
    gets N(0, 0.05) noise and LayerNorm gains N(0, 0.1), so every tensor matters. At init scale
    (std 0.02) GELU inputs and attention scores are ~0.1: exact-erf GELU and a wrong attention
    scale moved logits by only 1e-6 and 4e-4. Scaled, logits are O(1) (max |logit| ~3) and those
    bugs move them by >= 5e-4 and >= 0.3, far above the 1e-5 bound; correct code stays ~1e-6.
    """
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(hf_config(shape)).eval()
    if perturb:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():  # the tied lm_head is wte, listed once
                if p.dim() == 2:
                    p.mul_(WEIGHT_SCALE)  # O(1) pre-activations and attention scores, O(1) logits
                elif name.endswith("bias"):
                    p.add_(0.05 * torch.randn(p.shape, generator=generator))  # biases init at zero
                elif ".ln_" in name:
                    p.add_(0.1 * torch.randn(p.shape, generator=generator))  # LayerNorm gains init at one
    return model


def save_checkpoint(hf_model, directory: str | Path, layout: str) -> Path:
    """Write hf_model to directory (created) in the named layout; returns the directory."""
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # 'transformer.'-prefixed parameters, without the tied head, as independent contiguous tensors
    tensors = {k: v.detach().clone().contiguous() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    config = hf_model.config
    C = config.n_embd

    def save_safetensors(t, name="model.safetensors"):
        save_file(t, str(directory / name), metadata={"format": "pt"})

    if layout == "safetensors":
        hf_model.save_pretrained(directory)
    elif layout == "sharded-safetensors":
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        hf_model.save_pretrained(directory, max_shard_size=max(total // N_SHARDS, 1))
    elif layout == "bin":
        config.save_pretrained(directory)
        torch.save(hf_model.state_dict(), directory / "pytorch_model.bin")  # lm_head.weight included, tied
    elif layout == "sharded-bin":
        config.save_pretrained(directory)
        _save_sharded_bin(tensors, directory)
    elif layout in ("no-prefix", "with-buffers"):
        config.save_pretrained(directory)
        plain = {k.removeprefix("transformer."): v for k, v in tensors.items()}
        if layout == "with-buffers":
            T = config.n_positions
            for i in range(config.n_layer):
                plain[f"h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
                plain[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        save_safetensors(plain)
    else:  # bad checkpoints
        if layout != "no-config":
            config.save_pretrained(directory)
        if layout == "missing-key":
            del tensors["transformer.h.0.mlp.c_fc.bias"]
        elif layout == "wrong-shape":
            key = "transformer.h.0.mlp.c_fc.weight"
            tensors[key] = tensors[key].t().contiguous()  # (4C, C): nn.Linear's layout, not Conv1D's
        elif layout == "unexpected-key":
            tensors["transformer.h.0.attn.extra.weight"] = torch.zeros(C, C)
        save_safetensors(tensors)
        if layout == "truncated":
            path = directory / "model.safetensors"
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
    return directory


_models: dict[str, torch.nn.Module] = {}


def get_hf_model(shape_name: str):
    """The process's random HF model of the named shape (built once, shared: do not modify it)."""
    if shape_name not in _models:
        _models[shape_name] = make_hf_model(SHAPES_BY_NAME[shape_name])
    return _models[shape_name]


def checkpoint_dirs(tmp_path_factory):
    """make(layout, shape_name="tiny") -> Path of a directory holding that shape's get_hf_model saved in `layout`,
    written once per tmp_path_factory (treat as read-only: copy_checkpoint to modify). The checkpoint_dir fixture."""
    cache = {}

    def make(layout: str, shape_name: str = "tiny"):
        key = (layout, shape_name)
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"ckpt-{shape_name}-{layout}")
            cache[key] = save_checkpoint(get_hf_model(shape_name), directory, layout)
        return cache[key]

    return make


class RunsCode:
    """Unpickling this creates `marker`: proof that a loader ran code from the file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _save_sharded_bin(tensors: dict[str, torch.Tensor], directory: Path):
    """pytorch_model-0000i-of-0000n.bin files and the pytorch_model.bin.index.json naming them."""
    keys = list(tensors)
    n = min(N_SHARDS, len(keys))
    groups = [keys[i * len(keys) // n : (i + 1) * len(keys) // n] for i in range(n)]
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
        torch.save({k: tensors[k] for k in group}, directory / name)
        weight_map.update({k: name for k in group})
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A private copy of a checkpoint directory, for tests that modify files."""
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- the originals' .pt files


def torch_ref_model(hf_model, gelu: str = "tanh", dropout: float = 0.0):
    """A torch_ref.GPT (eval) holding hf_model's weights: the originals' nn.Linear layout; gelu="exact" and a
    dropout for nanoGPT's model."""
    import torch_ref

    c = hf_model.config
    config = torch_ref.GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                                 n_head=c.n_head, n_embd=c.n_embd, gelu=gelu, dropout=dropout)
    model = torch_ref.load_state_dict(torch_ref.GPT(config), torch_ref.hf_to_torch_state_dict(hf_model.state_dict()))
    return model.eval()


def load_as_the_originals_do(path: Path):
    """(torch_ref.GPT, the dict) of a .pt read as the originals' scripts read theirs: torch.load(weights_only=False)
    in a __main__ that defines GPTConfig (train_gpt2.py), GPT(ckpt['config']) for build-nanogpt,
    GPT(GPTConfig(**model_args)) with '_orig_mod.' stripped for nanoGPT; load_state_dict strict. torch_ref stands
    for their GPT (the same modules, parameter names and order; its GPTConfig has no bias), for nanoGPT's with its
    model.py's exact GELU and model_args' dropout."""
    import torch_ref

    main = sys.modules["__main__"]
    saved = main.__dict__.get("GPTConfig")
    main.GPTConfig = torch_ref.GPTConfig
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    finally:
        del main.GPTConfig
        if saved is not None:
            main.GPTConfig = saved
    if "model_args" in ckpt:
        args = ckpt["model_args"]
        assert args["bias"] is True, args
        shape = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")
        config = torch_ref.GPTConfig(**{k: args[k] for k in shape}, gelu="exact", dropout=args["dropout"])
    else:
        config = ckpt["config"]
    model = torch_ref.GPT(config)
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}, strict=True)
    return model.eval(), ckpt


def save_build_nanogpt(model, path: Path, module: str = "train_gpt2_run_as_main") -> Path:
    """torch.save what build-nanogpt's train_gpt2.py saves, its GPTConfig dataclass living in `module`, which
    exists only while saving (as train_gpt2.py's __main__ exists only while it runs)."""
    fields = [(name, int) for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")]
    config_class = dataclasses.make_dataclass("GPTConfig", fields)
    config_class.__module__ = module
    sys.modules[module] = types.ModuleType(module)
    sys.modules[module].GPTConfig = config_class
    try:
        config = config_class(**{name: getattr(model.config, name) for name, _ in fields})
        torch.save({"model": model.state_dict(), "config": config, "step": 19072, "val_loss": 3.07}, path)
    finally:
        del sys.modules[module]
    return path


def save_nanogpt(model, path: Path, optimizer=None, bias: bool = True) -> Path:
    """torch.save what nanoGPT's train.py saves for a model trained under torch.compile ('_orig_mod.' keys)."""
    c = model.config
    model_args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size, bias=bias,
                      vocab_size=c.vocab_size, dropout=c.dropout)
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items() if bias or not k.endswith(".bias")}
    optimizer = optimizer or model.configure_optimizers(0.1, 6e-4, "cpu")
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "model_args": model_args, "iter_num": 2000,
                "best_val_loss": torch.tensor(1.4697), "config": {**model_args, "compile": True}}, path)
    return path
