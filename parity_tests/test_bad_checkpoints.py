"""Each broken HF checkpoint fails with a CheckpointError that names the problem."""

import pytest

from flax_gpt import GPT
from flax_gpt.hf import CheckpointError

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
