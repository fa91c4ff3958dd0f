"""Each broken HF checkpoint fails with a CheckpointError that names the problem."""

import json
import shutil

import pytest

from flax_gpt import GPT
from flax_gpt.hf import CheckpointError
from parity_tests.checkpoints import copy_checkpoint

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


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not in the HF cache|not a model on the HF hub"):
        GPT.from_pretrained("no-such-org/no-such-gpt2-model")


# ----------------------------------------------------------------------------- safe loading


class _RunsCode:
    """Unpickling this creates `marker`: proof that a loader ran code from the file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_bin_that_would_run_code_is_refused_and_never_run(checkpoint_dir, tmp_path):
    import torch

    model_dir = copy_checkpoint(checkpoint_dir("bin"), tmp_path / "model")
    marker = tmp_path / "code_ran"
    state = torch.load(model_dir / "pytorch_model.bin", weights_only=True)
    state["h.0.attn.c_attn.bias"] = _RunsCode(str(marker))  # an otherwise valid file with one poisoned entry
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
