"""HuggingFace GPT-2 checkpoints <-> flax_gpt.GPT, without torch for safetensors.

HF GPT-2 stores `Conv1D` weights as (in, out), the layout of a Flax Linear kernel, so no
transposes are needed: only renaming, stacking the per-layer tensors along a new leading
axis, and padding the token embedding to the padded vocabulary. Tensors are streamed one at
a time, so peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open

from flax_gpt.config import GPTConfig
from flax_gpt.errors import UserError
from flax_gpt.model import GPT

HUB_IDS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# Keys a GPT-2 file may hold that carry no parameter: the tied head and old causal-mask buffers.
_IGNORED = re.compile(r"^(lm_head\.weight|h\.\d+\.attn\.(bias|masked_bias))$")
_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# config.json's activation_function -> GPTConfig.gelu: GPT-2's tanh approximation (two names), torch's exact GELU
GELU_FROM_HF = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "exact"}
GELU_TO_HF = {"tanh": "gelu_new", "exact": "gelu"}


class CheckpointError(UserError):
    """A checkpoint file or directory that cannot be loaded as GPT-2."""


# ----------------------------------------------------------------------------- names


def hf_name(path: tuple[str, ...], layer: int | None = None) -> str:
    """HF key (without 'transformer.') of a flax parameter path, e.g. h.3.attn.c_attn.weight."""
    *modules, leaf = path
    if modules[0] == "h":
        modules = ["h", str(layer), *modules[1:]]
    return ".".join([*modules, _LEAF_TO_HF[leaf]])


def _strip_prefix(key: str) -> str:
    return key.removeprefix("transformer.")


# ----------------------------------------------------------------------------- config


def config_from_hf(hf: Mapping, **overrides) -> GPTConfig:
    """GPTConfig from the dict in an HF GPT-2 config.json; unsupported variants raise."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"config.json has model_type {hf.get('model_type')!r}, expected 'gpt2'")
    activation = hf.get("activation_function", "gelu_new")
    if not isinstance(activation, str) or activation not in GELU_FROM_HF:
        raise CheckpointError(f"config.json: activation_function={activation!r} is not supported (GPT-2's 'gelu_new' "
                              "or 'gelu_pytorch_tanh', or the exact 'gelu')")
    checks = {
        "layer_norm_epsilon": (hf.get("layer_norm_epsilon", 1e-5), (1e-5,)),
        "n_inner": (hf.get("n_inner"), (None, 4 * hf.get("n_embd", 768))),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), (True,)),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True), (True,)),
    }
    for name, (value, allowed) in checks.items():
        if value not in allowed:
            raise CheckpointError(f"config.json: {name}={value!r} is not supported (GPT-2 uses {allowed[0]!r})")
    fields = dict(
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)), vocab_size=hf.get("vocab_size", 50257),
        n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=hf.get("n_embd", 768),
        gelu=GELU_FROM_HF[activation],
    )
    try:
        return GPTConfig(**{**fields, **overrides})
    except ValueError as e:
        raise CheckpointError(f"config.json: {e}") from None


def config_to_hf(config: GPTConfig) -> dict:
    """The config.json dict transformers needs to build the same GPT-2."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "activation_function": GELU_TO_HF[config.gelu], "layer_norm_epsilon": 1e-5,
        "n_positions": config.block_size, "n_ctx": config.block_size, "vocab_size": config.vocab_size,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True,
    }


# ----------------------------------------------------------------------------- files


def resolve(name_or_path: str | Path) -> Path:
    """A local checkpoint directory, downloading (or reading from the HF cache) a hub id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: no config.json; an HF GPT-2 directory needs config.json and weights")
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the directory that holds config.json and the weights")
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CheckpointError(f"{name}: no such directory")
    return _download(name)


def _download(repo_id: str) -> Path:
    """Snapshot of a hub repo's config and weights (safetensors preferred), honouring HF_HUB_OFFLINE."""
    # here, not at the top: huggingface_hub reads HF_HUB_OFFLINE on its first import, so a process that sets it after
    # importing flax_gpt (a test, a notebook) is honoured
    from huggingface_hub import errors as hub_errors, snapshot_download

    try:
        local = Path(snapshot_download(repo_id, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json"]))
        if not list(local.glob("*.safetensors")):
            local = Path(snapshot_download(repo_id, allow_patterns=["config.json", "pytorch_model*.bin", "*.bin.index.json"]))
    except (hub_errors.RepositoryNotFoundError, hub_errors.HFValidationError):
        raise CheckpointError(f"{repo_id!r} is neither a local directory nor a model on the HF hub (try one of {', '.join(HUB_IDS)})") from None
    except (hub_errors.LocalEntryNotFoundError, OSError) as e:
        raise CheckpointError(f"cannot fetch {repo_id!r} from the HF hub and it is not in the HF cache "
                              f"(offline?): {type(e).__name__}; pass a local directory instead") from None
    return resolve(local)


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory: one file or the shards of an index."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (directory / index_name).is_file():
            index = _read_json(directory / index_name)
            shards = sorted(set(index.get("weight_map", {}).values()))
            files = [(directory / s).resolve() for s in shards]
            for f in files:  # a shard name must stay inside the checkpoint directory
                if directory.resolve() not in f.parents:
                    raise CheckpointError(f"{directory / index_name}: shard {f.name!r} points outside the directory")
                if not f.is_file():
                    raise CheckpointError(f"{directory / index_name}: shard file {f.name} is missing")
            return files
        if (directory / single).is_file():
            return [directory / single]
    raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin (nor a sharded index of either)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None


def _safetensors_offsets(path: Path) -> tuple[int, dict]:
    """(byte offset of the data, header entries) of a safetensors file: u64 length + JSON header."""
    with path.open("rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        data_start = f.tell()
    header.pop("__metadata__", None)
    return data_start, header


class TensorReader:
    """HF tensors by name over one or more weight files, each copied straight into its destination.

    safetensors: the library validates the file and gives the shapes; each tensor's bytes are
    then read with readinto() into the caller's buffer, so no per-tensor temporaries pile up
    in the heap (BENCHMARKS.md, loading HF weights). .bin: torch.load with weights_only=True
    (never runs pickled code) and mmap=True.
    """

    def __init__(self, files: list[Path]):
        self._readers: dict[str, Callable[[np.ndarray], None]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            try:
                self._open_safetensors(f) if f.suffix == ".safetensors" else self._open_bin(f)
            except CheckpointError:
                raise
            except Exception as e:  # safetensors, zip and unpickling errors have no common base
                raise CheckpointError(f"{f}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                                      "the file is truncated or corrupt, download it again") from None

    def _open_safetensors(self, f: Path):
        with safe_open(str(f), framework="numpy") as handle:  # validates header and sizes
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        data_start, entries = _safetensors_offsets(f)
        for key, shape in shapes.items():
            if _IGNORED.match(_strip_prefix(key)):
                continue  # buffers (U8 or BOOL masks, too) are never read
            entry = entries[key]
            dtype = np.dtype(_SAFETENSORS_DTYPES[_check_dtype(f, key, entry["dtype"], _SAFETENSORS_DTYPES)])
            self._add(key, shape, lambda out, f=f, e=entry, d=dtype, s=shape: _read_into(f, data_start, e, d, s, out))

    def _open_bin(self, f: Path):
        import torch  # an optional dependency, only to read a .bin

        state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        for key, t in state.items():
            if _IGNORED.match(_strip_prefix(key)):
                continue
            _check_dtype(f, key, str(t.dtype).removeprefix("torch."), _BIN_DTYPES)
            self._add(key, tuple(t.shape), lambda out, t=t: np.copyto(out, t.float().numpy()))

    def _add(self, key: str, shape: tuple[int, ...], read_into: Callable[[np.ndarray], None]):
        self.shapes[_strip_prefix(key)] = shape
        self._readers[_strip_prefix(key)] = read_into

    def read_into(self, key: str, out: np.ndarray) -> None:
        """Copy tensor `key` into the float32 array `out` of its shape."""
        self._readers[key](out)

    def keys(self):
        return self.shapes.keys()

    def close(self):
        self._readers.clear()  # drops the .bin mappings


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
_BIN_DTYPES = ("float32", "float16", "bfloat16", "float64")  # torch dtype names, as above


def _check_dtype(path: Path, key: str, dtype: str, readable) -> str:
    """dtype, if a parameter of that dtype can be read; else a CheckpointError naming the file and key."""
    if dtype not in readable:
        raise CheckpointError(f"{path}: tensor {_strip_prefix(key)} has dtype {dtype}; parameters are read from "
                              f"{', '.join(readable)}")
    return dtype


def _read_into(path: Path, data_start: int, entry: dict, dtype: np.dtype, shape, out: np.ndarray) -> None:
    begin, end = entry["data_offsets"]
    with path.open("rb") as f:
        f.seek(data_start + begin)
        if dtype == np.float32 and out.flags.c_contiguous:
            f.readinto(memoryview(out).cast("B"))  # bytes land in place: no temporary
        else:
            out[...] = np.frombuffer(f.read(end - begin), dtype).reshape(shape)


# ----------------------------------------------------------------------------- load / save


def from_hf_state_dict(tensors: Mapping[str, np.ndarray], config: GPTConfig) -> GPT:
    """A GPT built from HF-named tensors (keys with or without 'transformer.'), checked first."""
    if not isinstance(tensors, TensorReader):
        tensors = _MappingReader(tensors)
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: GPT(config)))
    flat = nnx.to_flat_state(abstract_state)
    _check_names_and_shapes(tensors, flat, config)
    filled = [(path, var.replace(_assemble(tensors, path, var, config))) for path, var in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def _expected_shapes(flat, config: GPTConfig) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path, var in flat:
        if path[0] == "h":
            for i in range(config.n_layer):
                shapes[hf_name(path, i)] = tuple(var.shape[1:])
        elif path == ("wte", "embedding"):
            shapes[hf_name(path)] = (config.vocab_size, config.n_embd)
        else:
            shapes[hf_name(path)] = tuple(var.shape)
    return shapes


def _check_names_and_shapes(tensors, flat, config: GPTConfig):
    expected = _expected_shapes(flat, config)
    present = {k for k in tensors.keys() if not _IGNORED.match(k)}
    if missing := sorted(set(expected) - present, key=_natural):
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:5])}")
    if unexpected := sorted(present - set(expected), key=_natural):
        raise CheckpointError(f"checkpoint has {len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:5])}")
    for key, shape in expected.items():
        if tuple(tensors.shapes[key]) != shape:
            raise CheckpointError(f"tensor {key} has shape {tuple(tensors.shapes[key])}, the config needs {shape}")


def _assemble(tensors, path, var, config: GPTConfig):
    """One flax parameter from its HF tensor(s): layers stacked, the vocabulary padded."""
    buffer = np.zeros(var.shape, np.float32)  # (L, ...) for blocks, (Vp, C) for wte
    if path[0] == "h":
        for i in range(config.n_layer):
            tensors.read_into(hf_name(path, i), buffer[i])
    else:
        rows = tensors.shapes[hf_name(path)][0]
        tensors.read_into(hf_name(path), buffer[:rows])  # wte rows >= vocab_size stay zero
    if buffer.dtype != var.dtype:
        array = jnp.asarray(buffer, dtype=var.dtype)
    else:
        array = jax.device_put(buffer, may_alias=True)  # on CPU the array may keep this memory
    return array.block_until_ready()  # transfer done before the next buffer is allocated


def _natural(key: str):
    return [int(p) if p.isdigit() else p for p in key.split(".")]


class _MappingReader:
    """TensorReader's interface over an in-memory dict."""

    def __init__(self, tensors: Mapping):
        self._tensors = {_strip_prefix(k): v for k, v in tensors.items()}
        self.shapes = {k: tuple(np.shape(v)) for k, v in self._tensors.items()}

    def read_into(self, key: str, out: np.ndarray) -> None:
        out[...] = np.asarray(self._tensors[key], dtype=np.float32)

    def keys(self):
        return self._tensors.keys()


def load_pretrained(name_or_path: str | Path, **overrides) -> GPT:
    """GPT from an HF GPT-2 hub id or local directory; overrides set e.g. dtype or vocab_multiple."""
    directory = resolve(name_or_path)
    config = config_from_hf(_read_json(directory / "config.json"), **overrides)
    reader = TensorReader(_weight_files(directory))
    try:
        return from_hf_state_dict(reader, config)
    finally:
        reader.close()


def to_hf_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """HF-named float32 tensors ('transformer.' prefix, Conv1D layout, no lm_head)."""
    config = model.config
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(var[...], dtype=np.float32)
        if path[0] == "h":
            for i in range(config.n_layer):
                out["transformer." + hf_name(path, i)] = np.ascontiguousarray(value[i])
        elif path == ("wte", "embedding"):
            out["transformer." + hf_name(path)] = np.ascontiguousarray(value[: config.vocab_size])
        else:
            out["transformer." + hf_name(path)] = value
    return out

