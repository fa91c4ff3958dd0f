"""Faults never cost a run, each checked with real `python train.py` processes: SIGKILL in the middle of a
checkpoint write, damaged checkpoints on disk, and a loss that turns NaN. SIGKILL mid-training and Ctrl-C are
in test_train.py.

Faults that cannot be timed from outside are injected by a wrapper (FAULT_SCRIPT) that patches one function
and then runs train.py unchanged: it SIGKILLs the process after a checkpoint's files are written but before
orbax's rename commits them, or turns the parameters to NaN after a given optimizer step.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from train_runs import (LONG, LONG_STEPS, PYTHON, TRAIN_PY, Spec, assert_refused, ckpt_steps, needs,
                        read_records, scheduled_runs, snapshot, train_losses, val_losses, with_args, work_dir)

KILL_STEP = 4  # SIGKILL while checkpoint 4 is being committed (checkpoints every 2 steps)
NAN_AFTER = 8  # parameters become NaN after 8 optimizer steps: checkpoint 8 holds them, 6 is the last good one

FAULT_SCRIPT = """
import os, runpy, signal, sys

fault, at, train_py, *argv = sys.argv[1:]
at = int(at)
if fault == "kill-in-save":
    from orbax.checkpoint._src.path import atomicity

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize_or_die(self):
        if self.get_final().name == str(at):  # every file of the step is written; the commit is not
            os.kill(os.getpid(), signal.SIGKILL)
        return await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_die
elif fault == "nan-after":
    import jax
    import jax.numpy as jnp
    from flax_gpt import train_step as ts

    make = ts.make_train_step

    def make_poisoned(*args, **kwargs):
        step = make(*args, **kwargs)

        def poisoned(state, x, y):
            state, metrics = step(state, x, y)
            if int(state.step) == at:  # as if this update had blown up
                state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
            return state, metrics

        return poisoned

    ts.make_train_step = make_poisoned
sys.argv = [train_py, *argv]
runpy.run_path(train_py, run_name="__main__")
"""


def fault(kind: str, at: int, argv: list[str]) -> list[str]:
    return [PYTHON, "-c", FAULT_SCRIPT, kind, str(at), str(TRAIN_PY), *argv]


def damage_steps(out: Path, steps: list[int]) -> None:
    """Cut every array data file of these checkpoint steps to half its size, as a bad copy would."""
    for step in steps:
        files = [p for p in (out / "checkpoints" / str(step) / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
        assert files, f"no array data files under {out}/checkpoints/{step}/state"
        for f in files:
            data = f.read_bytes()
            f.write_bytes(data[: len(data) // 2])


def copy_and_damage(work: Path, name: str, steps: list[int]):
    def before() -> dict:
        shutil.copytree(work / "ref", work / name)
        damage_steps(work / name, steps)
        return {"before": snapshot(work / name)}
    return before


def make_specs(work: Path) -> dict[str, Spec]:
    resume = [*LONG, "--resume"]
    return {
        "ref": Spec([*LONG, "--out-dir", "ref"]),  # never interrupted: checkpoints 16, 18, 20
        "kill_save": Spec(fault("kill-in-save", KILL_STEP, [*LONG, "--out-dir", "ks"]), command=True,
                          after=lambda: {"ckpts": ckpt_steps(work / "ks"),
                                         "entries": sorted(p.name for p in (work / "ks" / "checkpoints").iterdir())}),
        "kill_save_resume": Spec(with_args(resume, ["--out-dir", "ks"]), deps=("kill_save",)),
        "nan": Spec(fault("nan-after", NAN_AFTER, [*LONG, "--out-dir", "nan"]), command=True, later_than=("ref",),
                    after=lambda: {"entries": sorted(p.name for p in (work / "nan" / "checkpoints").iterdir()),
                                   "records": read_records(work / "nan")}),  # before nan_resume rewrites them
        "nan_resume": Spec(with_args(resume, ["--out-dir", "nan"]), deps=("nan",)),
        "damaged_latest": Spec(with_args(resume, ["--out-dir", "dl"]), deps=("ref",),
                               before=copy_and_damage(work, "dl", [LONG_STEPS])),
        "damaged_all": Spec(with_args(resume, ["--out-dir", "da"]), deps=("ref",),
                            before=copy_and_damage(work, "da", [16, 18, 20]),
                            after=lambda: {"after": snapshot(work / "da")}),
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return work_dir(tmp_path_factory, "fault_runs")


@pytest.fixture(scope="module")
def runs(work, request):
    yield from scheduled_runs(make_specs(work), work, request)


def assert_same_as_reference(work: Path, out: str, from_step: int) -> None:
    """Every train loss, grad norm and val loss of `out` from `from_step` on equals the reference run's, bit for bit."""
    ref, got = read_records(work / "ref"), read_records(work / out)
    for key in ("loss", "grad_norm"):
        a = {r["step"]: r[key] for r in ref if key in r}
        b = {r["step"]: r[key] for r in got if key in r}
        assert sorted(b) == list(range(LONG_STEPS)), sorted(b)
        assert {s: b[s] for s in range(from_step, LONG_STEPS)} == {s: a[s] for s in range(from_step, LONG_STEPS)}
    assert {s: v for s, v in val_losses(got).items() if s >= from_step} == \
        {s: v for s, v in val_losses(ref).items() if s >= from_step}
    train_losses(got)  # no step recorded twice


@needs("ref", "kill_save", "kill_save_resume")
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(runs, work):
    killed = runs.result("kill_save")
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    # checkpoint 2 is committed; 4 exists only as orbax's uncommitted tmp directory
    assert killed.extra["ckpts"] == [KILL_STEP - 2], killed.extra
    assert any(e.startswith(f"{KILL_STEP}.orbax-checkpoint-tmp") for e in killed.extra["entries"]), killed.extra
    resumed = runs.result("kill_save_resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    assert f"done: {LONG_STEPS - (KILL_STEP - 2)} steps" in resumed.stdout, resumed.stdout
    assert ckpt_steps(work / "ks")[-1] == LONG_STEPS
    assert_same_as_reference(work, "ks", KILL_STEP - 2)


@needs("ref", "damaged_latest")
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(runs, work):
    r = runs.result("damaged_latest")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, r.stderr[-3000:]
    assert f"checkpoints/{LONG_STEPS} is unreadable" in warnings[0] and "using step 18 instead" in warnings[0]
    assert f"kept as {LONG_STEPS}.unreadable" in warnings[0], warnings[0]
    # the damaged step is kept, renamed; the run redid steps 18 and 19 exactly and wrote a good 20
    set_aside = work / "dl" / "checkpoints" / f"{LONG_STEPS}.unreadable"
    assert set_aside.is_dir()
    before = r.extra["before"]
    moved = {k.replace(f"checkpoints/{LONG_STEPS}/", f"checkpoints/{LONG_STEPS}.unreadable/", 1): v
             for k, v in before.items() if k.startswith(f"checkpoints/{LONG_STEPS}/")}
    after = snapshot(work / "dl")
    assert moved.items() <= after.items(), "the damaged checkpoint was changed, not just set aside"
    assert "done: 2 steps" in r.stdout, r.stdout
    assert_same_as_reference(work, "dl", 18)


@needs("ref", "damaged_all")
def test_no_readable_checkpoint_is_a_clear_refusal_that_changes_nothing(runs, work):
    r = runs.result("damaged_all")
    assert_refused(r, "no readable checkpoint", "step 20, 18, 16 are all damaged", "nothing was deleted", "--out-dir")
    assert r.extra["before"] == r.extra["after"], "a file of the damaged run was changed or removed"


@needs("ref")
def test_sampling_from_a_run_with_a_damaged_latest_checkpoint_uses_the_previous_one(runs, work, capsys):
    """load_model (behind generate, evaluate and export) reads the newest readable step and says so."""
    from flax_gpt.load import load_model

    assert runs.result("ref").returncode == 0
    shutil.copytree(work / "ref", work / "dl_read")
    damage_steps(work / "dl_read", [LONG_STEPS])
    before = snapshot(work / "dl_read")
    capsys.readouterr()
    model = load_model(str(work / "dl_read"))
    err = capsys.readouterr().err
    assert model.config.n_layer == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "is unreadable" in lines[0] and "using step 18" in lines[0], err
    assert snapshot(work / "dl_read") == before  # a reader never renames or deletes anything


@needs("ref", "nan", "nan_resume")
def test_a_nan_loss_stops_the_run_keeps_the_last_good_checkpoint_and_says_why(runs, work):
    r = runs.result("nan")
    assert_refused(r, f"training diverged: loss is nan at step {NAN_AFTER}", "the last good checkpoint is nan/checkpoints/6",
                   f"{NAN_AFTER}.diverged")
    # checkpoint 8 holds the NaN parameters: set aside, not deleted; 4 and 6 stay (saving 8 retired 2: keep 3)
    assert r.extra["entries"] == ["4", "6", f"{NAN_AFTER}.diverged"], r.extra
    records = r.extra["records"]
    assert records[-1] == {"step": NAN_AFTER, "stopped": f"diverged: loss is nan at step {NAN_AFTER}",
                           "last_good_checkpoint": 6}
    assert max(train_losses(records)) == NAN_AFTER - 1  # no NaN loss is recorded as a step
    # --resume continues from the good checkpoint (without the injected fault) exactly like a clean run
    resumed = runs.result("nan_resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"done: {LONG_STEPS - 6} steps" in resumed.stdout, resumed.stdout
    assert_same_as_reference(work, "nan", 6)
