"""Each broken HF checkpoint or .pt file fails with a CheckpointError that names the problem; none runs code."""

import json
import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from flax_gpt import GPT, torch_ckpt  # noqa: E402
from flax_gpt.hf import CheckpointError  # noqa: E402
from flax_gpt.load import load_model  # noqa: E402
from parity_tests.checkpoints import (RunsCode, checkpoint_dirs, copy_checkpoint, make_hf_model,  # noqa: E402
                                      save_build_nanogpt, save_nanogpt, torch_ref_model)

pytestmark = pytest.mark.torch  # torch and transformers build and write every checkpoint here
torch.set_num_threads(1)  # tiny models: as parity_tests/conftest.py, one intra-op thread (two were far slower here)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """checkpoint_dir(layout) -> a directory of the tiny shape's model in that layout, as in parity_tests."""
    return checkpoint_dirs(tmp_path_factory)

EXPECTED = {
    "missing-key": r"missing 1 tensor\(s\): h\.0\.mlp\.c_fc\.bias",
    "wrong-shape": r"tensor h\.0\.mlp\.c_fc\.weight has shape \(128, 32\), the config needs \(32, 128\)",
    "truncated": r"model\.safetensors: cannot read weights .*truncated or corrupt",
    "unexpected-key": r"unexpected tensor\(s\): h\.0\.attn\.extra\.weight",
    "no-config": r"no config\.json",
}


@pytest.mark.parametrize("layout", sorted(EXPECTED))
def test_bad_checkpoint_raises_named_error(checkpoint_dir, layout):
    with pytest.raises(CheckpointError, match=EXPECTED[layout]):
        GPT.from_pretrained(checkpoint_dir(layout))


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        GPT.from_pretrained(str(tmp_path / "nope"))


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    """Offline: the answer says the id is not in the HF cache (online, the hub would say it is no model), and
    nothing tries to reach the network."""
    import socket

    from huggingface_hub import constants

    attempts = []

    def no_network(*args):
        attempts.append(args)
        raise OSError("this test has no network")

    # huggingface_hub read HF_HUB_OFFLINE when it was first imported: its constant is what it consults now
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(CheckpointError, match=r"cannot fetch 'no-such-org/no-such-gpt2-model' from the HF hub "
                                              r"and it is not in the HF cache \(offline\?\)"):
        GPT.from_pretrained("no-such-org/no-such-gpt2-model")
    assert not attempts, attempts


# ----------------------------------------------------------------------------- safe loading


def test_a_bin_that_would_run_code_is_refused_and_never_run(checkpoint_dir, tmp_path):
    import torch

    model_dir = copy_checkpoint(checkpoint_dir("bin"), tmp_path / "model")
    marker = tmp_path / "code_ran"
    state = torch.load(model_dir / "pytorch_model.bin", weights_only=True)
    state["h.0.attn.c_attn.bias"] = RunsCode(str(marker))  # an otherwise valid file with one poisoned entry
    torch.save(state, model_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot read weights"):
        GPT.from_pretrained(str(model_dir))
    assert not marker.exists()


def test_a_shard_path_that_leaves_the_directory_is_refused(checkpoint_dir, tmp_path):
    model_dir = copy_checkpoint(checkpoint_dir("sharded-safetensors"), tmp_path / "model")
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    shutil.copy(model_dir / first, tmp_path / "outside.safetensors")  # a real file, outside the model directory
    index["weight_map"] = {k: ("../outside.safetensors" if v == first else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"shard 'outside\.safetensors' points outside the directory"):
        GPT.from_pretrained(str(model_dir))


def test_config_code_references_are_data_never_run(checkpoint_dir, tmp_path):
    """auto_map / trust_remote_code in config.json never import the module they name."""
    model_dir = copy_checkpoint(checkpoint_dir("safetensors"), tmp_path / "model")
    marker = tmp_path / "code_ran"
    (model_dir / "evil_gpt.py").write_text(f"open({str(marker)!r}, 'w')\n")
    config = json.loads((model_dir / "config.json").read_text())
    config |= {"auto_map": {"AutoModelForCausalLM": "evil_gpt.GPT"}, "trust_remote_code": True}
    (model_dir / "config.json").write_text(json.dumps(config))
    model = GPT.from_pretrained(str(model_dir))
    assert model.config.n_layer == config["n_layer"]
    assert not marker.exists()


# ----------------------------------------------------------------------------- build-nanogpt / nanoGPT .pt files


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """(torch_ref model, its build-nanogpt .pt, its nanoGPT .pt) of the tiny shape."""
    model = torch_ref_model(make_hf_model("tiny"))
    where = tmp_path_factory.mktemp("originals")
    return model, save_build_nanogpt(model, where / "model_19072.pt"), save_nanogpt(model, where / "ckpt.pt")


@pytest.mark.parametrize("where", ["val_loss", "config", "state dict"])
def test_a_pt_that_would_run_code_is_refused_and_never_run(original, tmp_path, where):
    import torch

    model, _, _ = original
    marker = tmp_path / "code_ran"
    ckpt = {"model": model.state_dict(), "config": {"n_layer": 2}, "step": 1, "val_loss": 3.0}
    if where == "state dict":
        ckpt["model"]["transformer.h.0.attn.c_attn.bias"] = RunsCode(str(marker))
    else:
        ckpt[where] = RunsCode(str(marker))
    torch.save(ckpt, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil\.pt: refused, it pickles more than tensors.*nothing in it was run"):
        load_model(tmp_path / "evil.pt")
    assert not marker.exists()


def _truncated(src, dst):
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])


def _untied(model, dst):
    import torch

    state = dict(model.state_dict())
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0  # a copy that differs from wte
    torch.save({"model": state, "config": {k: getattr(model.config, k) for k in torch_ckpt.SHAPE_FIELDS}}, dst)


@pytest.mark.parametrize("case, message", [
    ("truncated", r"not a torch\.save file, or truncated"),
    ("text", r"not a torch\.save file, or truncated"),
    ("unknown dict", r"neither a build-nanogpt checkpoint \('model' \+ 'config'\) nor a nanoGPT one .*'weights', 'epoch'"),
    ("bias=False", r"a nanoGPT model with bias=False; flax_gpt's GPT-2 has a bias in every Linear and LayerNorm"),
    ("untied head", r"lm_head\.weight differs from transformer\.wte\.weight"),
    ("no block_size", r"the model config has no block_size"),
    ("dropout 1.5", r"GPTConfig\.dropout must be in \[0, 1\), got 1\.5"),
    ("dropout text", r"model_args' dropout is 'high', not a number"),
])
def test_bad_pt_files_raise_named_errors(original, tmp_path, case, message):
    import torch

    model, build_nanogpt, nanogpt = original
    path = tmp_path / "bad.pt"
    if case == "truncated":
        _truncated(nanogpt, path)
    elif case == "text":
        path.write_text("not a checkpoint\n")
    elif case == "unknown dict":
        torch.save({"weights": model.state_dict(), "epoch": 3}, path)
    elif case == "bias=False":
        save_nanogpt(model, path, bias=False)
    elif case == "untied head":
        _untied(model, path)
    elif case.startswith("dropout"):
        ckpt = torch_ckpt.read(nanogpt)
        ckpt["model_args"]["dropout"] = 1.5 if case == "dropout 1.5" else "high"
        torch.save(ckpt, path)
    else:
        ckpt = torch_ckpt.read(build_nanogpt)
        del ckpt["config"]["block_size"]
        torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
