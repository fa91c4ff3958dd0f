"""`python train.py` end to end: real runs in subprocesses, kill / Ctrl-C and exact resume, fine-tuning
starts, and one-line errors for bad input. The runs are scheduled in the background (see train_runs.py).
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from flax_gpt.optim import OptimConfig, lr_at
from train_runs import (COMMON, CTRL_C_CKPT_INTERVAL, LONG, LONG_STEPS, PYTHON, SHORT, SIGNAL_AT_STEP, TRAIN_PY, Spec,
                        assert_one_error_line, assert_refused, check_exact_resume, ckpt_steps, corpus_text, needs,
                        read_records, scheduled_runs, snapshot, train_losses, val_losses, with_args, work_dir)

HF_SCRIPT = """
import sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
torch.set_num_threads(1)
model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257))
with torch.no_grad():  # far from GPT-2's init (large logits), so a run that ignored these weights shows it
    for p in model.parameters():
        p.normal_(0.0, 0.1)
    model.transformer.wte.weight.normal_(0.0, 1.0)
    model.transformer.ln_f.weight.fill_(1.0)
model.save_pretrained(sys.argv[1])
"""


MUON = ["--optimizer", "muon"]  # the killed run trains with Muon: its momentum must resume exactly too


def make_specs(work: Path) -> dict[str, Spec]:
    def state_of(out):  # what a killed / interrupted run left on disk
        return lambda: {"ckpts": ckpt_steps(work / out), "records": read_records(work / out)}

    return {  # plan order, 2 at a time: a20 compiles the shapes most runs share while cheap runs go beside it
        "a20": Spec([*LONG, "--out-dir", "a20"], before=lambda: {"out": "a20"}),
        "a20_bf16": Spec(with_args(LONG, ["--out-dir", "a20_bf16", "--dtype", "bf16", "--dropout", "0.1", *MUON]),
                         before=lambda: {"out": "a20_bf16"}),
        "hf_model": Spec([PYTHON, "-c", HF_SCRIPT, str(work / "hf_model")], command=True),
        "err_binary": Spec(with_args(COMMON, ["--data", "binary.dat", "--out-dir", "err_binary"])),
        "err_metal": Spec([*COMMON, "--device", "metal", "--out-dir", "err_metal"]),
        "a6": Spec([*SHORT, "--out-dir", "a6"]),
        "b_kill": Spec(with_args(LONG, ["--out-dir", "b", "--dtype", "bf16", "--dropout", "0.1", *MUON]),
                       deps=("a20_bf16",),
                       signal_at=(signal.SIGKILL, "b", True), after=state_of("b")),
        "c_int": Spec(with_args(LONG, ["--out-dir", "c", "--ckpt-interval", str(CTRL_C_CKPT_INTERVAL)]),
                      deps=("a20",), signal_at=(signal.SIGINT, "c", False), after=state_of("c")),
        # resumed without any other flag: the run's own come from its checkpoint
        "b_resume": Spec(["--out-dir", "b", "--resume"], deps=("b_kill",)),
        "c_resume": Spec(["--out-dir", "c", "--resume"], deps=("c_int",)),
        # a6's flags and shapes: after a6, hf finds every executable it needs in the compile cache
        "hf": Spec([*SHORT, "--init-from", "hf_model", "--out-dir", "hf", "--no-progress"], deps=("hf_model",),
                   later_than=("a6",)),
        "f": Spec(with_args(SHORT, ["--max-steps", "2", "--init-from", "a6", "--out-dir", "f", "--no-progress"]),
                  deps=("a6",), later_than=("b_resume",)),
        "err_existing": Spec([*SHORT, "--out-dir", "a6"], deps=("a6",), later_than=("f",),  # f reads a6
                             before=lambda: {"before": snapshot(work / "a6")},
                             after=lambda: {"after": snapshot(work / "a6")}),
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The working directory of every run: corpus.txt, binary.dat, and the caches."""
    work = work_dir(tmp_path_factory, "train_runs")
    (work / "binary.dat").write_bytes(bytes(range(256)) * 8)
    return work



@pytest.fixture(scope="module")
def runs(work, request):
    yield from scheduled_runs(make_specs(work), work, request)


# ----------------------------------------------------------------------------- in process: bad input


def load_cli():
    spec = importlib.util.spec_from_file_location("train_cli", TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """train.py's main(), run in tmp_path with its own token cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLAX_GPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "corpus.txt").write_text(corpus_text(), encoding="utf-8")
    return load_cli()


def short_text_case(tmp: Path):
    from flax_gpt.tokenizer import get_encoding

    text = "To be, or not to be: that is the question.\n"
    (tmp / "short.txt").write_text(text)
    n = 1 + len(get_encoding().encode_ordinary(text))  # <|endoftext|> + the text
    n_train = n - int(n * 0.1)  # prepare() keeps the last 10% for validation
    return ["--data", "short.txt"], [f"{n_train} tokens", "2*16+1 = 33"]


def small_vocab_model(tmp: Path) -> str:
    """An HF directory of a tiny GPT with a 128-token vocabulary (not GPT-2's)."""
    from flax_gpt import GPT, preset

    GPT(preset("tiny", vocab_size=128)).save_pretrained(str(tmp / "small_vocab"))
    return "small_vocab"


def write(path: Path, content: str | bytes) -> str:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path.name


BAD_INPUT = {  # id: (setup(tmp) -> (extra args, fragments the message must hold))
    "missing_data": lambda tmp: (["--data", "no_such_file.txt"], ["--data no_such_file.txt", "does not exist"]),
    "empty_file": lambda tmp: (["--data", write(tmp / "empty.txt", "")], ["empty.txt", "is empty"]),
    "not_utf8": lambda tmp: (["--data", write(tmp / "latin1.txt", "café au lait\n".encode("latin-1") * 50)],
                             ["latin1.txt", "not UTF-8", "0xe9", "offset 3"]),
    "shorter_than_a_batch": short_text_case,
    "unknown_preset": lambda tmp: (["--preset", "huge"], ["unknown preset 'huge'", "tiny"]),
    "batch_size_0": lambda tmp: (["--batch-size", "0"], ["--batch-size must be positive, got 0"]),
    "dropout_1": lambda tmp: (["--dropout", "1"], ["--dropout must be in [0, 1), got 1.0"]),
    "total_batch_not_multiple": lambda tmp: (["--total-batch-size", "100"],
                                             ["--total-batch-size 100", "multiple", "32"]),
    "seq_len_above_block_size": lambda tmp: (["--seq-len", "65", "--total-batch-size", "130"],
                                             ["--seq-len 65", "block_size 64"]),
    "attention_cudnn_on_cpu": lambda tmp: (["--attention", "cudnn"], ["--attention cudnn needs a CUDA GPU", "on cpu",
                                                                      "--attention xla"]),
    "init_from_dir_without_config": lambda tmp: ((tmp / "not_a_model").mkdir() or ["--init-from", "not_a_model"],
                                                 ["not_a_model", "config.json"]),
    "resume_without_checkpoint": lambda tmp: (["--resume"], ["--resume", "no checkpoint"]),
    "init_from_smaller_vocabulary": lambda tmp: (["--init-from", small_vocab_model(tmp)],
                                                 ["--init-from small_vocab", "vocabulary has 128 tokens",
                                                  "GPT-2 tokens (ids up to 50256)"]),
    "extend_without_resume": lambda tmp: (["--extend-steps", "5"], ["--extend-steps", "use it with --resume"]),
    "out_dir_not_writable": lambda tmp: (["--out-dir", "corpus.txt/run"], ["cannot write to --out-dir corpus.txt/run"]),
    "unknown_hub_id_offline": lambda tmp: (["--init-from", "no-such-org/no-such-gpt2"],
                                           ["'no-such-org/no-such-gpt2'", "not in the HF cache"]),
    "hellaswag_missing": lambda tmp: (["--hellaswag", "hs.jsonl"], ["--hellaswag hs.jsonl: no such file",
                                                                    "validation JSON Lines"]),
    "hellaswag_limit_without_file": lambda tmp: (["--hellaswag-limit", "10"],
                                                 ["--hellaswag-limit", "set how --hellaswag FILE is scored"]),
    "sample_prompt_too_long": lambda tmp: (["--sample-prompt", " ".join(["the king"] * 40)],
                                           ["--sample-prompt is 80 tokens, the model's context is 64"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_error_line_and_exit_2(case, cli, tmp_path, capsys):
    extra, fragments = BAD_INPUT[case](tmp_path)
    argv = with_args([*COMMON, "--max-steps", "6", "--no-progress"], extra)
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    line = assert_one_error_line(captured.err)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert captured.out == ""
    after = snapshot(tmp_path)
    assert before.items() <= after.items(), "an existing file was deleted or changed"
    assert not ckpt_steps(tmp_path / "out")


def test_read_records_leaves_out_only_a_cut_last_line(tmp_path):
    """The runs' metrics reader: a last line without its newline is a run cut mid-write; a bad line elsewhere fails."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"st')
    assert read_records(tmp_path) == [{"step": 0}, {"step": 1}]
    for text in ('{"step": 0}\n{"st\n{"step": 2}\n', '{"step": 0}\n{"st\n'):
        path.write_text(text)
        with pytest.raises(ValueError):
            read_records(tmp_path)


def test_accumulation_keeps_the_presets_tokens_per_step_whatever_the_batch_size():
    from flax_gpt.errors import UserError
    from flax_gpt.run_config import TrainConfig, grad_accum_steps, resolve

    def accum(processes=1, **flags):
        return grad_accum_steps(resolve(TrainConfig(preset="gpt2", **flags)), processes)

    assert accum() == 8  # build-nanogpt: 64 x 1024 x 8 = 524,288 tokens
    assert accum(batch_size=16) == 32
    assert accum(batch_size=16, processes=8) == 4
    assert accum(batch_size=8, seq_len=512, processes=2) == 64
    assert accum(batch_size=16, total_batch_size=65536) == 4
    with pytest.raises(UserError, match=r"the gpt2 preset's 524,288 tokens per step is not a multiple of .* 48\*1024\*1 "):
        accum(batch_size=48)


def test_out_of_memory_is_one_line_naming_what_to_lower(cli, tmp_path, monkeypatch, capsys):
    import jax

    from flax_gpt import train_step

    def step_that_runs_out(*args, **kwargs):
        def step(state, x, y):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 24.34GiB.")
        return step

    monkeypatch.setattr(train_step, "make_train_step", step_that_runs_out)
    capsys.readouterr()
    assert cli.main([*COMMON, "--max-steps", "6", "--no-progress", "--sample-tokens", "0"]) == 2
    line = assert_one_error_line(capsys.readouterr().err)
    for fragment in ("out of memory on cpu", "micro batch of 2x16", "lower --batch-size", "32 tokens per step",
                     "--remat"):
        assert fragment in line, (fragment, line)
    assert not ckpt_steps(tmp_path / "out")


def test_debug_reraises(cli):
    from flax_gpt.errors import UserError

    with pytest.raises(UserError, match="no_such_file.txt.*does not exist"):
        cli.main(with_args(COMMON, ["--data", "no_such_file.txt", "--debug"]))


# ----------------------------------------------------------------------------- subprocess runs


@needs("a6")
def test_run_writes_metrics_plot_and_checkpoints(runs, work):
    r = runs.result("a6")
    assert r.returncode == 0, r.stderr[-3000:]
    out = work / "a6"
    records = read_records(out)
    losses = train_losses(records)
    assert sorted(losses) == list(range(6))
    assert all(math.isfinite(v) for v in losses.values())
    vals = val_losses(records)
    assert sorted(vals) == [0, 3, 6]
    assert vals[6] < vals[0], vals  # measured: 10.840 -> 10.364
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ckpt_steps(out) == [2, 4, 6]  # keep_checkpoints=3: the newest three, the final step included
    assert "checkpoint a6/checkpoints/6" in r.stdout and "plot a6/loss.png" in r.stdout, r.stdout
    assert f"val loss {vals[0]:.4f} (step 0) -> {vals[6]:.4f} (step 6)" in r.stdout, r.stdout
    assert "Traceback" not in r.stderr
    assert "\r" not in r.stderr and "step/s" not in r.stderr, r.stderr[-500:]  # stderr is a file: no tqdm bar
    assert sum(" | loss " in line for line in r.stdout.splitlines()) == 6, r.stdout  # but a line per step
    # the lr of every step is build-nanogpt's get_lr for the tiny preset (lr 3e-3, 4 warmup steps, 6 steps)
    optim = OptimConfig(lr=3e-3, warmup_steps=4, max_steps=6)
    lrs = {rec["step"]: rec["lr"] for rec in records if "lr" in rec}
    assert lrs == {s: pytest.approx(lr_at(s, optim), rel=1e-6) for s in range(6)}


@needs("a6")
@pytest.mark.parametrize("extra, fragments", [
    ([], ["step 6", "the run is finished", "--extend-steps N", "final learning rate 0.0003"]),  # final val + plot stay
    (["--n-embd", "64"], ["holds another model (n_embd 32 in the checkpoint, 64 requested)", "--out-dir"]),
    (["--lr", "0.001", "--extend-steps", "2"], ["--lr 0.001 contradicts the run in a6/checkpoints (0.003)",
                                                "drop the flag", "--out-dir"]),
    (["--max-steps", "9"], ["--max-steps 9 contradicts the run in a6/checkpoints (6)", "--extend-steps N"]),
    (["--data", "corpus.txt", "--extend-steps", "2"], ["--data corpus.txt contradicts", "corpus.txt)"]),
    (["--dtype", "bf16", "--extend-steps", "2"], ["--dtype bf16 contradicts the run in a6/checkpoints (fp32)"]),
], ids=["finished_run", "another_model", "other_lr", "more_steps", "other_data", "other_dtype"])
def test_resume_refusals_change_nothing(extra, fragments, runs, work, cli, tmp_path, capsys):
    assert runs.result("a6").returncode == 0
    shutil.copytree(work / "a6", tmp_path / "a6")
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert cli.main(["--out-dir", "a6", "--resume", "--no-progress", *extra]) == 2
    line = assert_one_error_line(capsys.readouterr().err)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert snapshot(tmp_path).items() >= before.items()


def test_resume_refuses_a_changed_corpus_and_changes_nothing(cli, tmp_path, capsys):
    assert cli.main(with_args(SHORT, ["--max-steps", "2", "--out-dir", "run", "--no-progress"])) == 0
    with open(tmp_path / "corpus.txt", "a") as f:
        f.write("One more line of text.\n")
    before = snapshot(tmp_path / "run")
    capsys.readouterr()
    assert cli.main(["--out-dir", "run", "--resume", "--extend-steps", "1"]) == 2
    line = assert_one_error_line(capsys.readouterr().err)
    corpus = (tmp_path / "corpus.txt").resolve()
    assert f"the training data of the run in run/checkpoints changed: {corpus} has changed (its sha256)" in line
    assert snapshot(tmp_path / "run") == before


@needs("a6")
def test_extending_a_finished_run_trains_on_at_the_final_learning_rate(runs, work, cli, tmp_path, capsys):
    assert runs.result("a6").returncode == 0
    shutil.copytree(work / "a6", tmp_path / "a6")
    capsys.readouterr()
    assert cli.main(["--out-dir", "a6", "--resume", "--extend-steps", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resuming a6/checkpoints at step 6 of 8 (extended by 2: lr 0.0003 after step 6)" in out, out
    records = read_records(tmp_path / "a6")
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    old = {r["step"]: r["lr"] for r in read_records(work / "a6") if "lr" in r}
    assert lrs == {**old, 6: pytest.approx(3e-4, rel=1e-6), 7: pytest.approx(3e-4, rel=1e-6)}  # no jump back up
    assert ckpt_steps(tmp_path / "a6")[-1] == 8 and sorted(val_losses(records))[-1] == 8
    # a later plain --resume sees the extended run as finished at 8
    assert cli.main(["--out-dir", "a6", "--resume"]) == 2
    assert "is at step 8, the run is finished (--max-steps 8)" in capsys.readouterr().err


@needs("a20_bf16", "b_kill", "b_resume")
def test_resume_after_sigkill_is_exact_in_bf16_with_dropout_and_muon_without_flags(runs, work):
    """The dropout masks continue too (the key is in the checkpoint, the masks follow the step), and Muon's momentum."""
    killed = runs.result("b_kill")
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    assert killed.signalled_after is not None and killed.signalled_after >= SIGNAL_AT_STEP
    assert max(train_losses(killed.extra["records"])) < LONG_STEPS - 1  # really killed mid-run
    resumed = runs.result("b_resume")
    assert "dtype bfloat16" in resumed.stdout and "resuming b/checkpoints at step" in resumed.stdout, resumed.stdout
    assert "optimizer: muon" in resumed.stdout, resumed.stdout  # --optimizer came back from the checkpoint
    check_exact_resume(runs.result("a20_bf16"), killed, resumed, work / "b")


@needs("a20", "c_int", "c_resume")
def test_ctrl_c_checkpoints_exits_130_and_resumes_exactly_in_fp32_without_flags(runs, work):
    interrupted = runs.result("c_int")
    assert interrupted.returncode == 130, (interrupted.returncode, interrupted.stderr[-3000:])
    assert "Traceback" not in interrupted.stderr
    assert "interrupted: checkpoint written; continue with --resume" in interrupted.stderr
    records = interrupted.extra["records"]
    reached = max(train_losses(records)) + 1  # steps done when the loop stopped
    assert SIGNAL_AT_STEP < reached < LONG_STEPS
    # the interval's checkpoints so far, plus one at the step reached (off the interval unless by chance)
    assert interrupted.extra["ckpts"] == [*range(CTRL_C_CKPT_INTERVAL, reached, CTRL_C_CKPT_INTERVAL), reached]
    assert f"done: {reached} steps" in interrupted.stdout, interrupted.stdout
    assert f"checkpoint c/checkpoints/{reached}" in interrupted.stdout, interrupted.stdout
    assert check_exact_resume(runs.result("a20"), interrupted, runs.result("c_resume"), work / "c") == reached


def eval_loss(model, work: Path, monkeypatch) -> float:
    """The run's step-0 val loss, recomputed here: mean eval-step loss over the first val batch."""
    import jax
    from flax import nnx

    from flax_gpt import data
    from flax_gpt.train_step import make_eval_step

    monkeypatch.setenv("FLAX_GPT_CACHE", str(work / "cache"))
    tokens = data.prepare(work / "corpus.txt")
    graphdef, params = nnx.split(model, nnx.Param)
    eval_step = make_eval_step(graphdef)
    losses = [eval_step(params, x, y) for x, y in data.eval_batches(tokens.val, 2, 16, 1)]
    return float(np.mean(jax.device_get(losses)))


@pytest.mark.torch  # transformers writes the HF directory
@needs("hf_model", "hf", "a6")
def test_init_from_local_hf_directory(runs, work, monkeypatch):
    from flax_gpt import GPT

    assert runs.result("hf_model").returncode == 0, runs.result("hf_model").stderr[-3000:]
    r = runs.result("hf")
    assert r.returncode == 0, r.stderr[-3000:]
    vals = val_losses(read_records(work / "hf"))
    assert sorted(vals) == [0, 3, 6] and sorted(train_losses(read_records(work / "hf"))) == list(range(6))
    expected = eval_loss(GPT.from_pretrained(str(work / "hf_model")), work, monkeypatch)
    # measured: 29.739462 in the run and here, equal to the last bit (the eager model call: 29.739468);
    # fine-tuning then lowers it (measured 29.74 -> 26.55 after 6 steps)
    assert vals[0] == pytest.approx(expected, rel=1e-5)
    scratch = val_losses(read_records(work / "a6"))[0]
    assert abs(scratch - expected) > 1.0, (scratch, expected)  # the check tells the two inits apart (10.84)
    assert vals[6] < vals[0], vals


@needs("a6", "f")
def test_init_from_a_run_directory(runs, work):
    source = val_losses(read_records(work / "a6"))
    r = runs.result("f")
    assert r.returncode == 0, r.stderr[-3000:]
    vals = val_losses(read_records(work / "f"))
    # the source run's final params (checkpoint 6) on the same val batch; measured: 10.363618 both, bit-equal
    assert vals[0] == pytest.approx(source[6], rel=1e-6), (vals[0], source[6])
    assert vals[0] != pytest.approx(source[0], rel=1e-3)
    assert sorted(vals) == [0, 2] and ckpt_steps(work / "f") == [2]


@needs("err_binary", "err_metal")
@pytest.mark.parametrize("name, fragments", [
    ("err_binary", ["binary.dat", "not UTF-8", "NUL byte at offset 0"]),
    ("err_metal", ["--device metal needs the jax-mps plugin", "pip install 'flax-gpt[metal]'"]),
])
def test_bad_input_in_a_real_process(runs, work, name, fragments):
    r = runs.result(name)
    assert_refused(r, *fragments)
    assert r.stdout == ""
    assert (work / "binary.dat").read_bytes() == bytes(range(256)) * 8  # the input is left as it was
    assert not ckpt_steps(work / name)


@needs("a6", "err_existing")
def test_fresh_run_refuses_an_out_dir_with_checkpoints(runs, work):
    r = runs.result("err_existing")
    assert_refused(r, "a6 already holds a run's checkpoints", "--resume")
    assert r.extra["before"] == r.extra["after"]  # not one file of the old run changed or went
    assert ckpt_steps(work / "a6") == [2, 4, 6]
