"""Watching a run: HellaSwag during training (equal to the standalone evaluate, on 4 devices as on 1), TensorBoard
event files and W&B runs holding every scalar of metrics.jsonl (and going on after --resume), the plots, the samples.
The runs are scheduled in the background (see train_runs.py)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from train_runs import (COMMON, Spec, assert_one_error_line, ckpt_steps, hellaswag_examples, needs, read_records, scheduled_runs, with_args,
                        work_dir)

N_EXAMPLES = 24
FOUR_DEVICES = "--xla_force_host_platform_device_count=4"
# batch 4 (one row per device on 4 devices), evaluations and checkpoints every 3 steps
WATCH = [*with_args(COMMON, ["--batch-size", "4", "--total-batch-size", "64"]), "--max-steps", "6", "--eval-interval",
         "3", "--ckpt-interval", "3", "--hellaswag", "hs.jsonl", "--sample-prompt", "The king", "--no-progress"]
FAKE_WANDB = '''"""A stand-in for wandb that appends what it is called with to $FAKE_WANDB_LOG."""
import json, os


class Settings:
    mode = "fake"


class FakeWandbRun:
    settings = Settings()

    def __init__(self, **kwargs):
        self._write({"init": kwargs})

    def log(self, data, step):
        self._write({"log": data, "step": step})

    def finish(self):
        self._write({"finish": True})

    def _write(self, obj):
        with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
            f.write(json.dumps(obj) + "\\n")


def init(**kwargs):
    return FakeWandbRun(**kwargs)
'''


def labelled_from_init(examples: list[dict]) -> tuple[list[dict], float]:
    """The examples labelled so the model a run starts from (tiny preset, seed 1337) scores a known acc_norm: the
    first two thirds with its pick by mean loss, the rest with another ending. Returns (examples, that acc_norm)."""
    from flax_gpt import GPT, evaluate, preset

    pred_norm = evaluate.score_hellaswag(GPT(preset("tiny"), seed=1337), examples)["pred_norm"]
    keep = 2 * len(examples) // 3
    labelled = [dict(e, label=p if i < keep else (p + 1) % 4) for i, (e, p) in enumerate(zip(examples, pred_norm))]
    return labelled, keep / len(examples)


def make_specs(work: Path) -> dict[str, Spec]:
    paths = [str(work / "fake_wandb"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    fake = {"PYTHONPATH": os.pathsep.join(paths),
            "FAKE_WANDB_LOG": str(work / "fake_wandb.jsonl")}
    real = {"WANDB_MODE": "offline", "WANDB_DIR": str(work / "wandb_dir"), "WANDB_SILENT": "true"}

    def drop_last_checkpoint():  # resume mid-run: from step 3, with records and events of steps 3..6 to redo
        shutil.rmtree(work / "w1" / "checkpoints" / "6")
        return {"records": read_records(work / "w1")}

    return {
        "w1": Spec([*WATCH, "--tensorboard", "--wandb-project", "fake", "--out-dir", "w1"], env=fake),
        "w4": Spec([*with_args(WATCH, ["--sample-tokens", "0"]), "--wandb-project", "flax-gpt-test", "--out-dir", "w4"],
                   env={**real, "XLA_FLAGS": FOUR_DEVICES}),
        # no other flag: --hellaswag, --tensorboard and --wandb-project come back from the checkpoint
        "w1_resume": Spec(["--out-dir", "w1", "--resume", "--extend-steps", "3", "--no-progress"], deps=("w1",),
                          env=fake, before=drop_last_checkpoint),
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """corpus.txt, hs.jsonl (labelled from the starting model), a stand-in wandb package."""
    work = work_dir(tmp_path_factory, "watch_runs")
    examples, acc_norm = labelled_from_init(hellaswag_examples(N_EXAMPLES))
    (work / "hs.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    (work / "init_acc_norm.json").write_text(json.dumps(acc_norm))
    (work / "fake_wandb" / "wandb").mkdir(parents=True)
    (work / "fake_wandb" / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    return work


@pytest.fixture(scope="module")
def runs(work, request):
    yield from scheduled_runs(make_specs(work), work, request)


def hellaswag_records(out: Path) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["hellaswag_acc"], r["hellaswag_acc_norm"]) for r in read_records(out) if "hellaswag_acc" in r}


def scalars_of(records: list[dict]) -> dict[str, dict[int, float]]:
    """{key: {step: value}} of every number in metrics.jsonl records but the step."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(k, {})[r["step"]] = v
    return out


# ----------------------------------------------------------------------------- missing packages
# (in process; they take `runs` so that the background runs start first)


@pytest.mark.parametrize("module, flags, fragment", [
    ("wandb", ["--wandb-project", "p"], "--wandb-project needs the wandb package, which is not installed: "
                                        "pip install 'flax-gpt[wandb]'"),
    ("tensorboardX", ["--tensorboard"], "--tensorboard needs the tensorboardX package, which is not installed: "
                                        "pip install 'flax-gpt[tensorboard]'"),
])
def test_a_missing_logging_package_is_one_error_line(module, flags, fragment, runs, tmp_path, monkeypatch, capsys):
    from test_train import load_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, module, None)  # `import wandb` raises ImportError, as without the package
    capsys.readouterr()
    assert load_cli().main([*COMMON, "--max-steps", "2", *flags]) == 2
    assert assert_one_error_line(capsys.readouterr().err) == f"error: {fragment}"
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_wandb_that_cannot_start_is_one_line_naming_login_and_offline(tmp_path, monkeypatch):
    import types

    from flax_gpt.errors import UserError
    from flax_gpt.sinks import WandbSink

    def init(**kwargs):  # an error of wandb's own, of several lines (online, without a login, say)
        raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])\nmore detail")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with pytest.raises(UserError) as e:
        WandbSink("proj", "abcd1234", {}, tmp_path)
    assert str(e.value) == ("--wandb-project proj: W&B did not start (api_key not configured (no-tty). call "
                            "wandb.login(key=[your_api_key])); run `wandb login`, or set WANDB_MODE=offline to log "
                            "locally and `wandb sync` later")


# ----------------------------------------------------------------------------- HellaSwag


@needs("w1", "w4")
def test_hellaswag_during_training_on_4_devices_equals_1_and_the_starting_model(runs, work):
    one, four = runs.result("w1"), runs.result("w4")
    assert one.returncode == 0, one.stderr[-3000:]
    assert four.returncode == 0, four.stderr[-3000:]
    assert "4 devices, sharding dp" in four.stdout
    assert f"hellaswag: {N_EXAMPLES} examples of hs.jsonl every 3 steps, 24 batches of 4x32 tokens" in four.stdout
    a, b = hellaswag_records(work / "w1"), hellaswag_records(work / "w4")
    # measured: equal at every step; (acc, acc_norm) (0.208, 0.667), (0.167, 0.583), (0.167, 0.5) at steps 0, 3, 6
    assert sorted(b) == [0, 3, 6] and {s: a[s] for s in b} == b
    # step 0 is the fresh init, which labelled the file: acc_norm 16/24 by construction (chance: 1/4)
    assert b[0][1] == json.loads((work / "init_acc_norm.json").read_text()) == 2 / 3
    assert "| hellaswag acc " in one.stdout and f"acc_norm {b[0][1]:.4f} (16/24, " in one.stdout, one.stdout


# ----------------------------------------------------------------------------- W&B, offline (the real package)


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file (LevelDB log blocks after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, records, pending = path.read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last part of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@needs("w4")
def test_wandb_offline_run_holds_every_scalar(runs, work):
    from flax_gpt.checkpoint import Checkpointer

    r = runs.result("w4")
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = Checkpointer(work / "w4" / "checkpoints", read_only=True)
    run_id = ckpt.restore_meta()["wandb_run_id"]
    ckpt.close()
    assert f"logging to W&B: project flax-gpt-test, run {run_id} (offline)" in r.stdout
    [run_dir] = (work / "wandb_dir" / "wandb").glob(f"offline-run-*-{run_id}")  # WANDB_DIR is honoured
    records = read_wandb_records(run_dir / f"run-{run_id}.wandb")
    [run] = [x.run for x in records if x.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.project) == (run_id, "flax-gpt-test")
    history: dict[str, dict[int, float]] = {}
    for x in records:
        if x.WhichOneof("record_type") == "history":
            for item in x.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    history.setdefault(key, {})[x.history.step.num] = json.loads(item.value_json)
    want = scalars_of(read_records(work / "w4"))
    assert history == {k: {s: pytest.approx(v, rel=1e-12) for s, v in by_step.items()} for k, by_step in want.items()}


# ----------------------------------------------------------------------------- samples
# (in process, while w1_resume runs: the one background run left, so two processes for the two cores)


def test_each_evaluation_samples_with_its_own_seed_after_the_prompt_and_redraws_the_plots(tmp_path, monkeypatch,
                                                                                           capsys):
    from flax_gpt import generate, train
    from flax_gpt.tokenizer import get_encoding
    from test_train import load_cli
    from train_runs import corpus_text

    calls, drawn = [], []

    def fake_generate(model, idx, n, **kw):  # the prompt back with n tokens of "!" (id 0)
        calls.append((list(idx[0]), n, kw["seed"]))
        return np.array([list(idx[0]) + [0] * n])

    monkeypatch.setattr(generate, "generate", fake_generate)
    monkeypatch.setattr(train, "PLOT_EVERY_S", 0.0)
    real_draw = train.draw_plots
    monkeypatch.setattr(train, "draw_plots", lambda r: drawn.append(len(r.metrics_log.read())) or real_draw(r))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLAX_GPT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_text(corpus_text())
    assert load_cli().main([*COMMON, "--max-steps", "4", "--eval-interval", "2", "--seed", "7", "--sample-prompt",
                            "The king", "--no-progress"]) == 0
    prompt = get_encoding().encode("The king")
    assert calls == [(prompt, 8, 7), (prompt, 8, 9), (prompt, 8, 11)]  # seed + step at steps 0, 2, 4
    samples = [r["sample"] for r in read_records(tmp_path / "out") if "sample" in r]
    assert samples == ["The king!!!!!!!!"] * 3
    # after the evaluations at steps 0 and 2 (1 and 4 records so far: val 0, train 0, 1, val 2), and at the end (7)
    assert drawn == [1, 4, 7]
    assert "step     2 | val loss " in capsys.readouterr().out


@needs("w1", "w1_resume")
def test_hellaswag_during_training_equals_the_standalone_evaluate(runs, work, capsys):
    from flax_gpt import evaluate

    resumed = runs.result("w1_resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ckpt_steps(work / "w1")[-1] == 9
    trained = hellaswag_records(work / "w1")
    assert sorted(trained) == [0, 3, 6, 9]
    out = work / "standalone.json"
    assert evaluate.main(["--init-from", str(work / "w1"), "--hellaswag", str(work / "hs.jsonl"), "--dtype", "fp32",
                          "--json", str(out)]) == 0
    h = json.loads(out.read_text())["hellaswag"]
    assert (h["acc"], h["acc_norm"]) == trained[9], (h, trained[9])  # the final checkpoint's, both in fp32
    assert len(set(h["pred_norm"])) > 1  # the model tells the endings apart: the comparison could fail


# ----------------------------------------------------------------------------- TensorBoard, W&B across a resume


@needs("w1", "w1_resume")
def test_tensorboard_holds_every_scalar_and_a_resume_appends(runs, work):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    assert runs.result("w1_resume").returncode == 0
    assert "logging to TensorBoard: tensorboard --logdir w1/tensorboard" in runs.result("w1_resume").stdout
    tb = work / "w1" / "tensorboard"
    files = sorted(tb.glob("events.out.tfevents.*"))
    assert len(files) == 2  # one file per session, in the same run directory
    # each session starts with a SessionLog.START at its first step: TensorBoard drops the older events from there
    starts = [[e.step for e in EventFileLoader(str(f)).Load() if e.HasField("session_log")] for f in files]
    assert starts == [[0], [3]], starts
    events = EventAccumulator(str(tb), size_guidance={"tensors": 0})  # TensorBoard's own reader
    events.Reload()
    want = scalars_of(read_records(work / "w1"))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "val_loss", "hellaswag_acc_norm"} <= set(want)
    assert set(events.Tags()["tensors"]) == set(want) | {"sample/text_summary"}
    for key, by_step in want.items():
        got = {e.step: make_ndarray(e.tensor_proto).item() for e in events.Tensors(key)}
        assert got == {s: pytest.approx(v, rel=1e-6) for s, v in by_step.items()}, key  # float32 in the events
    assert sorted(want["loss"]) == list(range(9)) and sorted(want["val_loss"]) == [0, 3, 6, 9]  # steps continue
    texts = {e.step: make_ndarray(e.tensor_proto).item().decode() for e in events.Tensors("sample/text_summary")}
    assert texts == {r["step"]: r["sample"] for r in read_records(work / "w1") if "sample" in r}


@needs("w1", "w1_resume")
def test_wandb_run_id_is_kept_in_the_checkpoint_and_a_resume_logs_on_into_it(runs, work):
    from flax_gpt.checkpoint import Checkpointer

    assert runs.result("w1_resume").returncode == 0
    calls = [json.loads(line) for line in (work / "fake_wandb.jsonl").read_text().splitlines()]
    inits = [c["init"] for c in calls if "init" in c]
    ckpt = Checkpointer(work / "w1" / "checkpoints", read_only=True)
    run_id = ckpt.restore_meta()["wandb_run_id"]
    ckpt.close()
    assert len(inits) == 2 and [i["id"] for i in inits] == [run_id, run_id] and len(run_id) == 8
    assert all(i["resume"] == "allow" and i["project"] == "fake" for i in inits)
    assert inits[0]["config"]["hellaswag"] == str((work / "hs.jsonl").resolve())
    second = calls[calls.index({"init": inits[1]}) + 1 :]
    assert min(c["step"] for c in second if "log" in c) == 3  # the resumed session logs from its checkpoint on
    assert sum("finish" in c for c in calls) == 2


# ----------------------------------------------------------------------------- plots


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


@needs("w1", "w4", "w1_resume")
def test_plot_overlays_runs_and_each_run_draws_its_panels(runs, work, capsys):
    from flax_gpt import plot

    assert runs.result("w1_resume").returncode == 0 and runs.result("w4").returncode == 0
    panels = ["loss", "learning rate", "gradient norm (before clipping)", "throughput", "HellaSwag acc_norm"]
    for run in ("w1", "w4"):
        assert png_size(work / run / "metrics.png") == (1240, 1020) and png_size(work / run / "loss.png") == (770, 462)
    capsys.readouterr()
    assert plot.main([str(work / "w1"), str(work / "w4" / "metrics.jsonl"), "--out", str(work / "ab.png")]) == 0
    assert capsys.readouterr().out == f"wrote {work / 'ab.png'}: {', '.join(panels)} of 2 run(s)\n"
    assert png_size(work / "ab.png") == (1240, 1020)
    assert plot.main([str(work / "w1"), str(work / "nowhere")]) == 2
    line = assert_one_error_line(capsys.readouterr().err)
    assert f"{work / 'nowhere'}: no metrics.jsonl" in line
