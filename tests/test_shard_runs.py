"""`python train.py --data DIR` on token shards, in real processes: prepare's output with small shards (windows cross
files), SIGKILL and --resume bit-identical in one process and in two; build-nanogpt, nanoGPT and llm.c
directories as those projects write them; an unfinished prepare refused."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest

from test_shards import write_format
from train_runs import (COMMON, LONG, PYTHON, SIGNAL_AT_STEP, TRAIN_PY, Spec, assert_refused, check_exact_resume, ckpt_steps,
                        corpus_text, needs, read_records, scheduled_runs, train_losses, with_args, work_dir)

SHARD_TOKENS, VAL_TOKENS = 100, 200  # ~60 train files of 100 tokens: about one window in six crosses two files
ON_SHARDS = with_args(LONG, ["--data", "shards"])
TWO_PROCESSES = r"""
import os, socket, subprocess, sys
with socket.socket() as s:  # held while the processes run: train_runs.held_port
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2"}
    procs = [subprocess.Popen([sys.executable, *sys.argv[1:]], env={**env, "JAX_PROCESS_ID": str(i)}) for i in range(2)]
    codes = [p.wait() for p in procs]
sys.exit(next((c for c in codes if c), 0))
"""
SHORT_RUN = [*with_args(COMMON, ["--sample-tokens", "0"]), "--max-steps", "2", "--eval-interval", "2",
             "--ckpt-interval", "2", "--no-progress"]


def two_processes(args: list[str]) -> list[str]:
    return [PYTHON, "-c", TWO_PROCESSES, str(TRAIN_PY), *args]


def make_specs(work: Path) -> dict[str, Spec]:
    def state_of(out):
        return lambda: {"ckpts": ckpt_steps(work / out), "records": read_records(work / out)}

    def named(out):
        return lambda: {"out": out}

    prep = [PYTHON, "-m", "flax_gpt.prepare", "corpus.txt", "more.jsonl", "--out", "shards", "--shard-tokens",
            str(SHARD_TOKENS), "--val-tokens", str(VAL_TOKENS), "--chunk-bytes", "2000", "--no-progress"]
    two = [*ON_SHARDS, "--batch-size", "1"]  # 1 row per process: the global batch of the one-process runs
    return {  # plan order, 2 at a time; a run after the one that compiled its shapes finds them in the compile cache
        "prep": Spec(prep, command=True),
        "err_unfinished": Spec(with_args(SHORT_RUN, ["--data", "unfinished", "--out-dir", "err_unfinished"])),
        "s_ref": Spec([*ON_SHARDS, "--out-dir", "s_ref"], deps=("prep",), before=named("s_ref")),
        "p2_ref": Spec(two_processes([*two, "--out-dir", "p2_ref"]), deps=("prep",), command=True, group=True,
                       before=named("p2_ref")),
        "s_kill": Spec([*ON_SHARDS, "--out-dir", "s"], deps=("s_ref",), signal_at=(signal.SIGKILL, "s", True),
                       after=state_of("s")),
        "s_resume": Spec([*ON_SHARDS, "--out-dir", "s", "--resume"], deps=("s_kill",)),
        "p2_kill": Spec(two_processes([*two, "--out-dir", "p2"]), deps=("p2_ref",), command=True, group=True,
                        signal_at=(signal.SIGKILL, "p2", True), after=state_of("p2")),
        "p2_resume": Spec(two_processes([*two, "--out-dir", "p2", "--resume"]), deps=("p2_kill",), command=True,
                          group=True),
        "err_none2": Spec(two_processes(with_args(SHORT_RUN, ["--data", "shards", "--sharding", "none",
                                                             "--out-dir", "err_none2"])), deps=("prep",), command=True,
                          group=True),
        **{f"fmt_{fmt}": Spec(with_args(SHORT_RUN, ["--data", fmt, "--out-dir", f"run_{fmt}"]), deps=("s_ref",))
           for fmt in ("build-nanogpt", "nanoGPT", "llm.c")},
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """corpus.txt and more.jsonl (to prepare), a directory in each foreign format, an unfinished prepare."""
    from flax_gpt.tokenizer import EOT, get_encoding

    work = work_dir(tmp_path_factory, "shard_runs")
    lines = corpus_text(600, seed=1).splitlines()
    (work / "more.jsonl").write_text("".join(f'{{"text": "{" ".join(lines[i:i + 3])}"}}\n' for i in range(0, 600, 3)))
    tokens = np.array([EOT] + get_encoding().encode_ordinary(corpus_text(300, seed=2)), np.uint16)
    splits = {"val": [tokens[:300]], "train": [tokens[300:1500], tokens[1500:]]}
    for fmt in ("build-nanogpt", "llm.c"):
        write_format(work / fmt, fmt, splits)
    write_format(work / "nanoGPT", "nanoGPT", {"val": [tokens[:300]], "train": [tokens[300:]]})
    (work / "unfinished").mkdir()
    (work / "unfinished" / "prepare-progress.json").write_text("{}")
    return work


@pytest.fixture(scope="module")
def runs(work, request):
    yield from scheduled_runs(make_specs(work), work, request)


def crossing_windows(work: Path, steps: int, batch: int) -> int:
    """How many of the training windows of the first `steps` steps span two shard files."""
    from flax_gpt.data import DataLoader
    from flax_gpt.shards import open_token_dir

    stream = open_token_dir(work / "shards").train
    loader = DataLoader(stream, batch, 16, seed=1337)
    order = [loader._permutation()[i] for i in range(steps * batch)]  # the windows the run reads, in order
    file_of = [int(np.searchsorted(stream.starts, s, side="right")) - 1 for s in (16 * np.array(order))]
    last_of = [int(np.searchsorted(stream.starts, s + 16, side="right")) - 1 for s in (16 * np.array(order))]
    return sum(a != b for a, b in zip(file_of, last_of))


@needs("prep", "s_ref", "s_kill", "s_resume")
def test_sigkill_and_resume_on_shards_is_exact(runs, work):
    assert runs.result("prep").returncode == 0, runs.result("prep").stderr
    assert len(list((work / "shards").glob("*_train_*.npy"))) > 50
    killed = runs.result("s_kill")
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    assert killed.signalled_after >= SIGNAL_AT_STEP and max(train_losses(killed.extra["records"])) < 19
    check_exact_resume(runs.result("s_ref"), killed, runs.result("s_resume"), work / "s")
    assert crossing_windows(work, 20, 2) >= 3  # measured: 5 of the 40 windows read span two files


@needs("prep", "p2_ref", "p2_kill", "p2_resume")
def test_sigkill_and_resume_of_two_processes_on_shards_is_exact(runs, work):
    ref = runs.result("p2_ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "x 2 processes" in ref.stdout and "devices, sharding dp" in ref.stdout
    killed = runs.result("p2_kill")
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    assert killed.signalled_after >= SIGNAL_AT_STEP and max(train_losses(killed.extra["records"])) < 19
    check_exact_resume(ref, killed, runs.result("p2_resume"), work / "p2")


@needs("prep", "err_none2")
def test_two_processes_without_sharding_are_refused(runs, work):
    r = runs.result("err_none2")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, lines  # one line from each process
    assert all(line.startswith("error: --sharding none with 2 processes would train 2 unsynchronised copies")
               and "--sharding dp or fsdp" in line for line in lines), lines
    assert not ckpt_steps(work / "err_none2")


@needs("fmt_build-nanogpt", "fmt_nanoGPT", "fmt_llm.c")
@pytest.mark.parametrize("fmt", ["build-nanogpt", "nanoGPT", "llm.c"])
def test_other_projects_shards_train_as_they_are(runs, work, fmt):
    r = runs.result(f"fmt_{fmt}")
    assert r.returncode == 0, r.stderr[-3000:]
    n_tokens = len(np.concatenate([np.asarray(p) for p in _parts(work / fmt)]))
    assert f"data: {n_tokens - 300:,} train / 300 val tokens" in r.stdout, r.stdout
    assert sorted(train_losses(read_records(work / f"run_{fmt}"))) == [0, 1]


def _parts(folder: Path):
    from flax_gpt.shards import open_token_dir

    data = open_token_dir(folder)
    return data.train.parts + data.val.parts


@needs("err_unfinished")
def test_an_unfinished_prepare_is_refused(runs, work):
    r = runs.result("err_unfinished")
    assert_refused(r, "unfinished is an unfinished prepare", "re-run the same `python -m flax_gpt.prepare` command")
    assert not ckpt_steps(work / "err_unfinished")
