"""build-nanogpt / nanoGPT .pt files through the CLIs, in real processes: train.py starts from a nanoGPT file (its
exact GELU and dropout), the run is exported in both formats, read by the originals' loading code in a script of its
own (GPTConfig in its __main__) and sampled from; broken or hostile files end in one `error:` line and exit 2 in each
CLI, run nothing."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flax_gpt import generate as generate_cli
from flax_gpt.hf import from_hf_state_dict, to_hf_state_dict
from flax_gpt.load import load_run
from parity_tests.checkpoints import PADDED, RunsCode, make_hf_model, save_build_nanogpt, save_nanogpt, torch_ref_model
from train_runs import (COMMON, PYTHON, Spec, assert_refused, needs, read_records, scheduled_runs,
                        val_losses, with_args, work_dir)

pytestmark = pytest.mark.torch  # torch writes and reads every .pt here (and is imported above)

LOGITS_BOUND = 1e-5  # parity_tests/checks.py LOGITS_MAX_ABS
LOSS_REL = 1e-6  # parity_tests/checks.py LOSS_REL
RUN_STEPS = 3
RUN = [*with_args(COMMON, ["--sample-tokens", "0"]), "--max-steps", str(RUN_STEPS), "--eval-interval", "3",
       "--no-progress"]
SAMPLE = ["--prompt", "The king", "--max-new-tokens", "8", "--num-samples", "1", "--seed", "3"]

# The originals' loading code, run as __main__ like train_gpt2.py / sample.py; torch_ref.GPT stands for their GPT.
THEIR_SCRIPT = """
import dataclasses
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch_ref
from torch_ref.model import GPT


@dataclass
class GPTConfig:  # build-nanogpt's train_gpt2.py
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


build_nanogpt, nanogpt, out = sys.argv[1:]
idx = torch.from_numpy(np.arange(40).reshape(2, 20) * 997 % 50257)
ckpt = torch.load(build_nanogpt, map_location="cpu", weights_only=False)  # what build-nanogpt users load with
assert type(ckpt["config"]) is GPTConfig, type(ckpt["config"])
model = GPT(torch_ref.GPTConfig(**dataclasses.asdict(ckpt["config"])))  # torch_ref's defaults: tanh GELU, no dropout
model.load_state_dict(ckpt["model"])
with torch.serialization.safe_globals([GPTConfig]):  # torch >= 2.6's default weights_only=True, their class allowed
    assert torch.load(build_nanogpt, weights_only=True)["config"] == ckpt["config"]
result = {"build-nanogpt": model.eval()(idx)[0].detach().numpy(), "step": ckpt["step"], "val_loss": ckpt["val_loss"]}

checkpoint = torch.load(nanogpt, map_location="cpu")  # nanoGPT's train.py --init_from=resume and sample.py
model_args = checkpoint["model_args"]
assert model_args["bias"] is True
shape = {k: model_args[k] for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")}
gptconf = torch_ref.GPTConfig(**shape, gelu="exact", dropout=model_args["dropout"])  # nanoGPT's model.py
model = GPT(gptconf)
state_dict = checkpoint["model"]
unwanted_prefix = "_orig_mod."
for k, v in list(state_dict.items()):
    if k.startswith(unwanted_prefix):
        state_dict[k[len(unwanted_prefix):]] = state_dict.pop(k)
model.load_state_dict(state_dict)
optimizer = model.configure_optimizers(0.1, 6e-4, "cpu")  # nanoGPT's groups: decay for dim >= 2, none for the rest
optimizer.load_state_dict(checkpoint["optimizer"])
wte = model.transformer.wte.weight
result.update({"nanogpt": model.eval()(idx)[0].detach().numpy(), "dropout": model_args["dropout"],
               "iter_num": checkpoint["iter_num"],
               "best_val_loss": checkpoint["best_val_loss"], "adam_step": float(optimizer.state[wte]["step"]),
               "wte_exp_avg": optimizer.state[wte]["exp_avg"].numpy()})
np.savez(out, **result)
"""


THEIR_DROPOUT = 0.1


def their_model():
    """nanoGPT's model (the tiny preset's shape, vocab 50304): the exact GELU, dropout THEIR_DROPOUT."""
    return torch_ref_model(make_hf_model(PADDED), gelu="exact", dropout=THEIR_DROPOUT)


def their_files(work: Path) -> None:
    """A nanoGPT file of their_model to start from ('_orig_mod.' keys) and the refused inputs: code in a pickle,
    a bias=False nanoGPT model, a dict of neither kind, a cut file."""
    model = their_model()
    save_nanogpt(model, work / "theirs.pt")
    torch.save({"model": model.state_dict(), "config": RunsCode(str(work / "code_ran")), "step": 1}, work / "evil.pt")
    save_nanogpt(model, work / "no_bias.pt", bias=False)
    torch.save({"weights": model.state_dict(), "epoch": 3}, work / "unknown.pt")
    whole = save_build_nanogpt(model, work / "whole.pt").read_bytes()
    (work / "truncated.pt").write_bytes(whole[: len(whole) // 2])


def make_specs(work: Path) -> dict[str, Spec]:
    export = [PYTHON, "-m", "flax_gpt.export", "run"]
    generate = [PYTHON, "-m", "flax_gpt.generate", "--init-from"]
    return {
        # --dropout as nanoGPT's train.py takes it: from the flags, not the checkpoint (default 0)
        "run": Spec([*RUN, "--init-from", "theirs.pt", "--dropout", str(THEIR_DROPOUT), "--out-dir", "run"]),
        "export_bn": Spec([*export, "bn/model_00003.pt", "--format", "build-nanogpt"], deps=("run",), command=True),
        "export_ng": Spec([*export, "ng/ckpt.pt", "--format", "nanogpt"], deps=("run",), command=True),
        "theirs": Spec([PYTHON, "-c", THEIR_SCRIPT, "bn/model_00003.pt", "ng/ckpt.pt", "theirs.npz"],
                       deps=("export_bn", "export_ng"), command=True),
        "generate_pt": Spec([*generate, "ng/ckpt.pt", *SAMPLE], deps=("export_ng",), command=True),
        "refuse_evil": Spec([*generate, "evil.pt"], command=True),
        "refuse_no_bias": Spec([PYTHON, "-m", "flax_gpt.export", "no_bias.pt", "out_hf"], command=True),
        "refuse_unknown": Spec([*generate, "unknown.pt"], command=True),
        "refuse_truncated": Spec([PYTHON, "-m", "flax_gpt.evaluate", "--init-from", "truncated.pt", "--data",
                                  "corpus.txt"], command=True),
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = work_dir(tmp_path_factory, "original_ckpt_runs")
    their_files(work)
    return work


@pytest.fixture(scope="module")
def runs(work, request):
    yield from scheduled_runs(make_specs(work), work, request)


def succeeded(runs, name: str):
    result = runs.result(name)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@needs("run", "export_bn", "export_ng")
def test_export_cli_writes_both_formats_from_a_run(runs, work):
    """The run has nanoGPT's exact GELU: build-nanogpt's file is written with a note that its model is tanh's."""
    bn, ng = succeeded(runs, "export_bn").stdout, succeeded(runs, "export_ng").stdout
    assert f"wrote {work / 'bn' / 'model_00003.pt'}: build-nanogpt checkpoint, weights\n" in bn
    assert bn.endswith("\nnote: build-nanogpt's train_gpt2.py computes GPT-2's tanh GELU, this model the exact (erf) "
                       "GELU: the same weights give logits ~1e-3 apart there (docs/interop.md)\n")
    assert f"nanogpt checkpoint, weights + AdamW moments of step {RUN_STEPS}" in ng and "note:" not in ng
    assert sorted(p.name for p in (work / "ng").iterdir()) == ["ckpt.pt"]  # no temporary file left


@needs("run", "export_bn", "export_ng", "theirs")
def test_the_originals_load_our_files_and_continue_the_run(runs, work):
    succeeded(runs, "theirs")
    theirs = np.load(work / "theirs.npz")
    run = load_run(work / "run")
    assert (run.model.config.gelu, run.model.config.dropout) == ("exact", THEIR_DROPOUT) == ("exact", theirs["dropout"])
    # build-nanogpt's model computes the run's weights with the tanh GELU
    tanh = from_hf_state_dict(to_hf_state_dict(run.model), run.model.config.replace(gelu="tanh"))
    tanh.eval()  # built in train mode, as a GPT is; its dropout 0.1 is for training
    idx = np.arange(40).reshape(2, 20) * 997 % 50257  # as in THEIR_SCRIPT
    for fmt, model in (("build-nanogpt", tanh), ("nanogpt", run.model)):
        with jax.default_matmul_precision("highest"):
            ours = np.asarray(model(jax.numpy.asarray(idx))[0])
        diff = float(np.max(np.abs(theirs[fmt] - ours)))
        print(f"{fmt}: max |logits diff| theirs vs ours {diff:.2e}")  # measured 1.2e-6 each
        assert diff <= LOGITS_BOUND
    val = val_losses(read_records(work / "run"))
    assert theirs["step"] == theirs["iter_num"] == RUN_STEPS == run.step
    assert theirs["val_loss"] == val[RUN_STEPS] and theirs["best_val_loss"] == min(val.values())
    # the run's AdamW moments reached their optimizer: step count and wte's first moment, as saved in orbax
    assert theirs["adam_step"] == RUN_STEPS
    # read from the run's own mu, not through the exporter: wte's rows of the true vocabulary (an Embed, no transpose)
    expected = np.asarray(run.adam[0].wte.embedding[...])[: run.model.config.vocab_size]
    assert np.abs(expected).max() > 0 and np.array_equal(theirs["wte_exp_avg"], expected)


@needs("run", "export_ng", "generate_pt")
def test_generate_from_a_pt_samples_what_the_run_samples(runs, work, capsys, monkeypatch):
    from_pt = succeeded(runs, "generate_pt").stdout
    monkeypatch.chdir(work)
    assert generate_cli.main(["--init-from", "run", *SAMPLE]) == 0
    assert from_pt == capsys.readouterr().out and from_pt.startswith("--- sample 1/1 (seed 3)\nThe king")


@needs("run")
def test_train_init_from_a_nanogpt_file_starts_from_its_weights(runs, work, monkeypatch):
    """The run's val loss before its first step is the original model's loss on that val batch (true vocabulary)."""
    from flax_gpt import data as data_lib

    succeeded(runs, "run")
    monkeypatch.setenv("FLAX_GPT_CACHE", str(work / "cache"))  # the run's token cache
    (x, y), = data_lib.eval_batches(data_lib.load("corpus.txt", work).val, 2, 16, 1)  # RUN's val batch
    with torch.no_grad():
        logits, _ = their_model()(torch.from_numpy(x).long())  # (B, T, 50304)
    theirs = float(F.cross_entropy(logits[..., :50257].reshape(-1, 50257), torch.from_numpy(y).long().reshape(-1)))
    ours = val_losses(read_records(work / "run"))[0]
    print(f"val loss at step 0 {ours:.6f}, the original model's {theirs:.6f}")
    assert abs(ours - theirs) / theirs <= LOSS_REL


@pytest.mark.parametrize("name, fragments", [
    ("refuse_evil", ("evil.pt: refused, it pickles more than tensors", "nothing in it was run")),
    ("refuse_no_bias", ("no_bias.pt: a nanoGPT model with bias=False",)),
    ("refuse_unknown", ("unknown.pt: neither a build-nanogpt checkpoint", "'weights', 'epoch'")),
    ("refuse_truncated", ("truncated.pt: not a torch.save file, or truncated",)),
])
@needs("refuse_evil", "refuse_no_bias", "refuse_unknown", "refuse_truncated")
def test_bad_pt_files_end_in_one_error_line_and_run_nothing(runs, work, name, fragments):
    assert_refused(runs.result(name), *fragments)
    assert not (work / "code_ran").exists()
    assert not (work / "out_hf").exists()
