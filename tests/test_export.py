"""Export to an HF GPT-2 directory: transformers loads it with our logits, from_pretrained gives the
same bits back, the CLI exports a training run, and nothing is overwritten or left half-written (nor is a
build-nanogpt / nanoGPT .pt; their contents are checked in parity_tests and test_original_checkpoints_cli)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors import safe_open  # noqa: E402

from flax_gpt import export, torch_ckpt  # noqa: E402
from flax_gpt.config import preset  # noqa: E402
from flax_gpt.errors import UserError  # noqa: E402
from flax_gpt.hf import CheckpointError, config_from_hf, from_hf_state_dict, to_hf_state_dict  # noqa: E402
from flax_gpt.load import TrainedModel, load_model  # noqa: E402
from flax_gpt.model import GPT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOGITS_BOUND = 1e-5  # parity_tests/checks.py LOGITS_MAX_ABS: flax vs transformers, tiny random models with O(1) logits


@pytest.fixture(autouse=True, scope="module")
def fp32_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def perturbed_gpt(config, seed: int = 0) -> GPT:
    """A random GPT whose every tensor matters: matrices x5 (O(1) logits), noisy biases and LayerNorm gains
    (as parity_tests.checkpoints.make_hf_model does to HF models). Padded wte rows stay zero."""
    model = GPT(config, seed=seed)
    rng = np.random.default_rng(seed + 1)
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(var[...])
        if path[-1] in ("kernel", "embedding"):
            value = value * 5.0
        elif path[-1] == "bias":
            value = value + 0.05 * rng.standard_normal(value.shape).astype(np.float32)
        else:  # LayerNorm scale
            value = value + 0.1 * rng.standard_normal(value.shape).astype(np.float32)
        flat.append((path, var.replace(jax.numpy.asarray(value))))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def params_of(model: GPT) -> dict:
    return {path: np.asarray(var[...]) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def hf_logits_diff(model: GPT, hf_dir: Path) -> float:
    """max |logits(ours) - logits(transformers from hf_dir)| on a fixed batch."""
    import torch
    from transformers import GPT2LMHeadModel

    hf, info = GPT2LMHeadModel.from_pretrained(hf_dir, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    c = model.config
    idx = np.random.default_rng(0).integers(0, c.vocab_size, size=(2, min(c.block_size, 40)), dtype=np.int32)
    ours, _ = model(jax.numpy.asarray(idx))
    with torch.no_grad():
        theirs = hf.eval()(torch.from_numpy(idx.astype(np.int64))).logits.numpy()
    assert theirs.shape == ours.shape
    return float(np.max(np.abs(np.asarray(ours) - theirs)))


@pytest.fixture(scope="module")
def odd_model():
    # 3 heads, vocab 101 (padded to 128), block 40: shapes where a transposed or padded tensor would show
    return perturbed_gpt(preset("tiny", n_layer=3, n_head=3, n_embd=48, block_size=40, vocab_size=101), seed=0)


@pytest.fixture(scope="module")
def exported(odd_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "hf"
    odd_model.save_pretrained(out)
    return out


def test_export_layout(exported, odd_model):
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert not [p for p in exported.parent.iterdir() if p.name != "hf"]  # temp dir gone
    c = odd_model.config
    with safe_open(str(exported / "model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        assert f.get_tensor("transformer.wte.weight").shape == (101, 48)  # padding rows dropped
        assert f.get_tensor("transformer.h.2.attn.c_attn.weight").shape == (48, 144)  # Conv1D (in, out)
    assert all(k.startswith("transformer.") for k in keys) and "lm_head.weight" not in keys
    assert len(keys) == 4 + 12 * c.n_layer  # wte, wpe, ln_f.{weight,bias} + 12 tensors per block
    config = json.loads((exported / "config.json").read_text())
    assert (config["n_layer"], config["n_head"], config["n_embd"], config["n_positions"], config["vocab_size"]) == (
        3, 3, 48, 40, 101)
    assert json.loads((exported / "generation_config.json").read_text())["eos_token_id"] == config["eos_token_id"]


@pytest.mark.torch  # transformers loads the export
def test_transformers_loads_the_export_with_our_logits(exported, odd_model):
    diff = hf_logits_diff(odd_model, exported)
    print(f"max |logits diff| flax vs transformers after export: {diff:.2e}")  # measured: ~1e-6 (odd shape)
    assert diff <= LOGITS_BOUND


def test_from_pretrained_gives_the_same_bits_back(exported, odd_model):
    back = GPT.from_pretrained(str(exported))
    assert back.config == odd_model.config
    ours, theirs = params_of(odd_model), params_of(back)
    assert ours.keys() == theirs.keys()
    for path in ours:
        assert ours[path].dtype == theirs[path].dtype and np.array_equal(ours[path], theirs[path]), path


@pytest.mark.torch  # transformers loads the export
def test_an_exact_gelu_model_round_trips_through_transformers(odd_model, tmp_path):
    """nanoGPT's exact GELU is written as transformers' "gelu" (its nn.GELU()): transformers computes our logits
    (with "gelu_new", tanh, they differ by 5.6e-4) and from_pretrained reads gelu="exact" back."""
    model = from_hf_state_dict(to_hf_state_dict(odd_model), odd_model.config.replace(gelu="exact"))
    model.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["activation_function"] == "gelu"
    diff = hf_logits_diff(model, tmp_path / "hf")
    print(f"max |logits diff| exact-GELU flax vs transformers after export: {diff:.2e}")  # measured 1.5e-6
    assert diff <= LOGITS_BOUND
    assert GPT.from_pretrained(str(tmp_path / "hf")).config == model.config  # gelu="exact" among them


@pytest.mark.parametrize("activation, gelu", [("gelu_new", "tanh"), ("gelu_pytorch_tanh", "tanh"), ("gelu", "exact")])
def test_hf_activation_functions_map_to_their_gelu(activation, gelu):
    assert config_from_hf({"activation_function": activation}).gelu == gelu


def test_other_hf_activation_functions_are_refused_in_one_line():
    with pytest.raises(CheckpointError, match=r"^config.json: activation_function='relu' is not supported "
                                              r"\(GPT-2's 'gelu_new' or 'gelu_pytorch_tanh', or the exact 'gelu'\)$"):
        config_from_hf({"activation_function": "relu"})


@pytest.mark.parametrize("fmt, gelu, note", [
    ("nanogpt", "exact", None), ("build-nanogpt", "tanh", None),
    ("nanogpt", "tanh", "note: nanoGPT's model.py computes the exact (erf) GELU, this model GPT-2's tanh GELU: the "
                        "same weights give logits ~1e-3 apart there (docs/interop.md)"),
    ("build-nanogpt", "exact", "note: build-nanogpt's train_gpt2.py computes GPT-2's tanh GELU, this model the exact "
                               "(erf) GELU: the same weights give logits ~1e-3 apart there (docs/interop.md)"),
])
def test_a_pt_export_notes_a_gelu_their_model_does_not_compute(fmt, gelu, note):
    assert torch_ckpt.gelu_note(preset("tiny", gelu=gelu), fmt) == note


def test_save_pretrained_returns_what_it_wrote(odd_model, tmp_path):
    result = export.save_pretrained(odd_model, tmp_path / "a" / "b")  # missing parents are created
    assert result["n_params"] == odd_model.num_params(non_embedding=False) - (128 - 101) * 48  # no padding rows
    assert Path(result["out_dir"]) == (tmp_path / "a" / "b").absolute()


# ----------------------------------------------------------------------------- from a training run


def write_train_run(run_dir: Path, optimizer: str = "adamw"):
    """A training out dir as train.py writes it: checkpoints/<step>/{state,meta} with the run's meta."""
    from flax_gpt.checkpoint import Checkpointer
    from flax_gpt.optim import OptimConfig, make_optimizer
    from flax_gpt.resume import config_record as _config_record
    from flax_gpt.run_config import TrainConfig
    from flax_gpt.train_step import init_state

    model = perturbed_gpt(preset("tiny"), seed=3)
    expected = params_of(model)
    tx = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=1, max_steps=2, optimizer=optimizer))
    _, state = init_state(model, tx)
    train_config = TrainConfig(preset="tiny", out_dir=str(run_dir), max_steps=2, optimizer=optimizer)
    meta = {"step": 2, "model_config": _config_record(model.config), "loader": {"epoch": 0, "position": 2},
            "train_config": dataclasses.asdict(train_config), "seed": 1337}
    ckpt = Checkpointer(run_dir / "checkpoints")
    ckpt.save(2, state, meta)
    ckpt.close()
    return run_dir, model, expected


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    return write_train_run(tmp_path_factory.mktemp("run"))


@pytest.mark.torch  # a .pt export needs torch
def test_a_muon_run_exports_its_weights_to_nanogpt_with_a_fresh_adamw(tmp_path, capsys):
    """nanoGPT's train.py has no Muon: the .pt holds the weights and an empty AdamW state, and the CLI says why."""
    run_dir, _, expected = write_train_run(tmp_path / "run", optimizer="muon")
    assert export.main([str(run_dir), str(tmp_path / "ckpt.pt"), "--format", "nanogpt"]) == 0
    out = capsys.readouterr().out
    assert "empty AdamW state (this run trained with Muon: nanoGPT's train.py has no Muon state" in out, out
    ckpt = torch_ckpt.read(tmp_path / "ckpt.pt")
    assert ckpt["optimizer"]["state"] == {} and ckpt["iter_num"] == 2
    weight = ckpt["model"]["transformer.h.1.mlp.c_fc.weight"].numpy()  # nn.Linear: (out, in)
    assert np.array_equal(weight, expected[("h", "mlp", "c_fc", "kernel")][1].T)


@pytest.mark.torch  # transformers loads the export
def test_export_cli_from_a_training_run(train_run, tmp_path):
    run_dir, model, expected = train_run
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "flax_gpt.export", str(run_dir), str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    n_params = sum(v.size for v in expected.values()) - (50304 - 50257) * 32  # without wte padding rows
    assert f"wrote {out}" in proc.stdout and f"{n_params:,} params" in proc.stdout, proc.stdout
    back = params_of(GPT.from_pretrained(str(out)))
    assert all(np.array_equal(back[p], expected[p]) for p in expected)
    diff = hf_logits_diff(model, out)
    print(f"max |logits diff| flax vs transformers, exported training run: {diff:.2e}")
    assert diff <= LOGITS_BOUND


def test_load_model_takes_a_run_dir_or_its_checkpoints_dir(train_run):
    run_dir, _, expected = train_run
    for path in (run_dir, run_dir / "checkpoints"):
        got = params_of(load_model(str(path)))
        assert all(np.array_equal(got[p], expected[p]) for p in expected)
    assert load_model(str(run_dir), dtype="bf16").config.dtype == "bfloat16"


def test_export_cli_from_an_hf_dir_in_process(exported, tmp_path, capsys):
    assert export.main([str(exported), str(tmp_path / "again")]) == 0
    assert "wrote" in capsys.readouterr().out
    for name in export.EXPORT_FILES:
        assert (tmp_path / "again" / name).read_bytes() == (exported / name).read_bytes()


# ----------------------------------------------------------------------------- refusals and failures


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_refuses_a_non_empty_dir_unless_overwrite(odd_model, exported, tmp_path, capsys):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty.*--overwrite"):
        export.save_pretrained(odd_model, target)
    assert export.main([str(exported), str(target)]) == 2
    assert "notes.txt" in one_line_error(capsys)
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name != "mine"]

    (target / "pytorch_model.bin").write_bytes(b"stale weights a loader would read")
    assert export.main([str(exported), str(target), "--overwrite"]) == 0
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "generation_config.json",
                                                         "model.safetensors", "notes.txt"]
    assert (target / "notes.txt").read_text() == "keep me"  # only stale weight files are removed


def test_a_previous_export_is_replaced_without_overwrite(odd_model, tmp_path):
    target = tmp_path / "hf"
    GPT(preset("tiny", vocab_size=101), seed=5).save_pretrained(target)
    export.save_pretrained(odd_model, target)
    assert params_of(GPT.from_pretrained(str(target))).keys() == params_of(odd_model).keys()
    assert json.loads((target / "config.json").read_text())["n_layer"] == 3


def test_refuses_a_file_as_out_dir(odd_model, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        export.save_pretrained(odd_model, tmp_path / "file")


def test_nothing_left_behind_on_failure(odd_model, tmp_path, monkeypatch):
    def half_write(tensors, path):
        path.write_bytes(b"\0" * 100)  # a partial model.safetensors ...
        raise OSError(28, "No space left on device")  # ... then the disk fills up

    monkeypatch.setattr(export, "_write_safetensors", half_write)
    with pytest.raises(UserError, match="No space left on device"):
        export.save_pretrained(odd_model, tmp_path / "new" / "deeper" / "hf")
    assert list(tmp_path.iterdir()) == []  # neither the temp dir nor the parents it made

    previous = tmp_path / "previous"
    monkeypatch.undo()
    export.save_pretrained(odd_model, previous)
    before = {p.name: p.read_bytes() for p in previous.iterdir()}
    monkeypatch.setattr(export, "_write_safetensors", half_write)
    with pytest.raises(UserError):
        export.save_pretrained(GPT(preset("tiny", vocab_size=101)), previous)
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before  # the old export is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["previous"]


@pytest.mark.parametrize("case", ["missing", "empty-dir", "not-a-run", "empty-step"])
def test_load_model_errors_are_one_line(case, tmp_path, capsys):
    path = tmp_path / "nope"
    if case == "empty-dir":
        path.mkdir()
    elif case == "not-a-run":
        path.mkdir()
        (path / "stuff.txt").write_text("hello")
    elif case == "empty-step":  # a step directory with nothing orbax can read
        (path / "checkpoints" / "5").mkdir(parents=True)
    with pytest.raises(UserError) as err:
        load_model(str(path))
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert export.main([str(path), str(tmp_path / "out")]) == 2
    one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_load_model_rejects_an_unknown_dtype(exported):
    with pytest.raises(UserError, match="dtype"):
        load_model(str(exported), dtype="int8")


# ----------------------------------------------------------------------------- build-nanogpt / nanoGPT files


@pytest.mark.torch  # a .pt is written and read with torch
@pytest.mark.parametrize("fmt", ["build-nanogpt", "nanogpt"])
def test_a_pt_is_replaced_only_with_overwrite(exported, tmp_path, capsys, fmt):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"their checkpoint")
    assert export.main([str(exported), str(target), "--format", fmt]) == 2
    assert "exists; choose another path or pass --overwrite" in one_line_error(capsys)
    assert target.read_bytes() == b"their checkpoint"
    assert export.main([str(exported), str(tmp_path), "--format", fmt]) == 2
    assert "is a directory; pass the checkpoint file to write" in one_line_error(capsys)
    assert export.main([str(exported), str(target), "--format", fmt, "--overwrite"]) == 0
    assert f"{fmt} checkpoint, weights" in capsys.readouterr().out
    assert torch_ckpt.read(target)["model"]["transformer.h.2.attn.c_attn.weight"].shape == (144, 48)  # nn.Linear
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


@pytest.mark.torch  # a .pt export refuses to start without torch
def test_a_failed_pt_export_leaves_nothing_behind(odd_model, tmp_path, monkeypatch):
    def half_write(ckpt, f):
        f.write(b"\0" * 100)  # a partial checkpoint ...
        raise OSError(28, "No space left on device")  # ... then the disk fills up

    monkeypatch.setattr(torch_ckpt, "save", half_write)
    with pytest.raises(UserError, match="No space left on device"):
        export.save_torch_checkpoint(TrainedModel(odd_model), tmp_path / "new" / "ckpt.pt", "nanogpt")
    assert list(tmp_path.iterdir()) == []  # neither the temporary file nor the parent it made
    (tmp_path / "ckpt.pt").write_bytes(b"previous")
    with pytest.raises(UserError):
        export.save_torch_checkpoint(TrainedModel(odd_model), tmp_path / "ckpt.pt", "build-nanogpt", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"] and (tmp_path / "ckpt.pt").read_bytes() == b"previous"


def test_without_torch_a_pt_is_one_line_naming_the_extra(exported, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    assert export.main([str(exported), str(tmp_path / "ckpt.pt"), "--format", "nanogpt"]) == 2
    assert "needs torch: pip install 'flax-gpt[torch]'" in one_line_error(capsys)
    assert not (tmp_path / "ckpt.pt").exists()
    (tmp_path / "theirs.pt").write_bytes(b"a checkpoint")
    with pytest.raises(UserError, match="needs torch"):
        load_model(tmp_path / "theirs.pt")
