"""The machinery of the tests that run `python train.py` in subprocesses: shared tiny settings, readers of a
run's outputs, and a background scheduler.

The subprocess runs are slow to start (jax import + compile), so a background scheduler launches every run
the selected tests of a module need as soon as its inputs exist, two at a time (this machine has 2 cores),
while the in-process tests run; tests then wait for the runs they check. The runs of a module share a JAX
persistent compilation cache (same flags -> same executables, so only the first run of a shape compiles).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO / "train.py"
PYTHON = sys.executable
MAX_SECONDS = 240  # per subprocess; a hung run fails its tests instead of hanging the suite


def with_args(base: list[str], extra: list[str]) -> list[str]:
    """base with the flags in extra replaced or added."""
    args, i = list(base), 0
    while i < len(extra):
        flag = extra[i]
        has_value = i + 1 < len(extra) and not extra[i + 1].startswith("--")
        if flag in args:
            j = args.index(flag)
            del args[j : j + (2 if has_value else 1)]
        args += extra[i : i + (2 if has_value else 1)]
        i += 2 if has_value else 1
    return args


# tiny settings: 2x16 tokens per step; the tiny preset's model is 2 layers, 32 wide, block_size 64
COMMON = ["--preset", "tiny", "--batch-size", "2", "--seq-len", "16", "--total-batch-size", "32", "--eval-batches", "1",
          "--sample-tokens", "8", "--data", "corpus.txt", "--dtype", "fp32"]
SHORT = [*COMMON, "--max-steps", "6", "--eval-interval", "3", "--ckpt-interval", "2"]  # test (a)
LONG = [*with_args(COMMON, ["--sample-tokens", "0"]), "--max-steps", "20", "--eval-interval", "5",
        "--ckpt-interval", "2", "--no-progress"]  # resume tests: long enough to stop mid-run
LONG_STEPS = 20
SIGNAL_AT_STEP = 3  # kill / interrupt once the train loss of this step is in metrics.jsonl
CTRL_C_CKPT_INTERVAL = 7  # the Ctrl-C run: checkpoints every 7 steps (numerics unchanged), so its stop is off-interval

WORDS = ("the king and queen of the old town spoke of love and war while a quick brown fox ran over "
         "the hill to find bread wine and gold for the long winter night").split()


def corpus_text(n_lines: int = 120, seed: int = 0) -> str:
    """A few KB of English-like text (about 1.4k GPT-2 tokens for 120 lines)."""
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(6, 13))).capitalize() + "." for _ in range(n_lines)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- records and files


def read_records(out: Path) -> list[dict]:
    """metrics.jsonl of a run. Only a last line without its newline may be cut (a run killed, or still writing,
    mid-line): that one is left out; any other line that is not JSON is an error."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    torn = lines[-1:] if lines and not text.endswith("\n") else []
    records = [json.loads(line) for line in lines[:len(lines) - len(torn)]]
    try:
        return records + [json.loads(line) for line in torn]
    except ValueError:
        return records


def train_losses(records: list[dict]) -> dict[int, float]:
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step is recorded twice: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def val_losses(records: list[dict]) -> dict[int, float]:
    steps = [r["step"] for r in records if "val_loss" in r]
    assert len(steps) == len(set(steps)), f"a val step is recorded twice: {steps}"
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


@contextlib.contextmanager
def held_port():
    """A free localhost port for JAX's coordinator, kept bound while the block runs.

    Bound with SO_REUSEPORT: gRPC, which JAX's coordination service runs on, binds its port with SO_REUSEPORT too,
    so the coordinator binds it beside this socket, and no other process can take the port in between (a plain
    bind of it is refused; a port released before the coordinator binds it can be taken, and the coordinator then
    dies with "Failed to add port to server"). This socket never listens: connections go to the coordinator.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def ckpt_steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def snapshot(root: Path, skip: tuple[str, ...] = ("cache", "jax_cache")) -> dict[str, str]:
    """{relative path: sha256} of every file under root (but the caches)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and rel.parts[0] not in skip:
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_one_error_line(stderr: str) -> str:
    """The user sees exactly one line, `error: ...`, and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def assert_refused(result: "Result", *fragments: str) -> str:
    """A run that exited 2 with one `error: ...` line holding every fragment; returns the line."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    line = assert_one_error_line(result.stderr)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


# ----------------------------------------------------------------------------- background runs


@dataclass
class Spec:
    argv: list[str]  # after `python train.py`, or a full command if `command` is set
    deps: tuple[str, ...] = ()  # runs that must have finished first
    later_than: tuple[str, ...] = ()  # runs to let finish first if they run at all (compile cache reuse)
    signal_at: tuple[int, str, bool] | None = None  # (signal, out dir, wait for a checkpoint): see _reap
    group: bool = False  # a command that starts processes of its own: signals go to its whole process group
    before: Callable[[], dict] | None = None  # called just before the start; its dict lands in Result.extra
    after: Callable[[], dict] | None = None  # called right after the end (before dependents start)
    command: bool = False
    env: dict = field(default_factory=dict)  # added to the scheduler's environment for this run


@dataclass
class Result:
    name: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    signalled_after: int | None = None  # the last train step recorded when the signal was sent
    extra: dict = field(default_factory=dict)


class Scheduler:
    """Runs the wanted specs (plan order, deps first) in a background thread, `slots` at a time."""

    def __init__(self, specs: dict[str, Spec], wanted: set[str], cwd: Path, env: dict, slots: int = 2):
        self.specs, self.cwd, self.env, self.slots = specs, cwd, env, slots
        self.pending = [name for name in specs if name in wanted]
        self.running: dict[str, tuple] = {}
        self.done: dict[str, Result] = {}
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.stop = False
        self.t0 = time.perf_counter()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def result(self, name: str) -> Result:
        assert name in self.specs
        with self.cond:
            if name not in self.done and name not in self.pending and name not in self.running:
                self.pending.insert(0, name)  # not foreseen: run it next
            while name not in self.done and self.error is None:
                self.cond.wait(1)
            if self.error is not None:
                raise self.error
            return self.done[name]

    def close(self):
        self.stop = True
        self.thread.join(30)
        with open(self.cwd / "timings.txt", "w") as f:  # seconds per run, for tuning the suite
            for r in self.done.values():
                f.write(f"{r.name:14s} rc {r.returncode:4d} start {r.extra['started_at']:6.1f} "
                        f"took {r.seconds:6.1f} s\n")
        for proc, *_ in self.running.values():
            proc.kill()

    def _loop(self):
        try:
            while not self.stop:
                with self.cond:
                    self._reap()
                    self._start()
                    self.cond.notify_all()
                time.sleep(0.01)
        except BaseException as e:  # surface scheduler bugs in the waiting test
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def _start(self):
        for name in list(self.pending):
            if len(self.running) >= self.slots:
                return
            spec = self.specs[name]
            if not all(d in self.done for d in spec.deps) or any(
                    d in self.pending or d in self.running for d in spec.later_than):
                continue
            self.pending.remove(name)
            extra = spec.before() if spec.before else {}
            extra["started_at"] = time.perf_counter() - self.t0
            cmd = spec.argv if spec.command else [PYTHON, str(TRAIN_PY), *spec.argv]
            out = open(self.cwd / f"{name}.stdout", "w"), open(self.cwd / f"{name}.stderr", "w")
            proc = subprocess.Popen(cmd, cwd=self.cwd, env={**self.env, **spec.env}, stdout=out[0], stderr=out[1],
                                    stdin=subprocess.DEVNULL, start_new_session=spec.group)
            self.running[name] = (proc, out, time.perf_counter(), extra, [None])

    def _reap(self):
        for name, (proc, out, t0, extra, signalled) in list(self.running.items()):
            spec = self.specs[name]
            if spec.signal_at and signalled[0] is None and proc.poll() is None:
                sig, out_dir, need_ckpt = spec.signal_at
                steps = train_losses(read_records(self.cwd / out_dir))
                # SIGKILL also waits for a complete checkpoint: orbax writes in the background, and a run
                # killed before its first checkpoint lands has nothing to resume from (--resume says so)
                if steps and max(steps) >= SIGNAL_AT_STEP and (ckpt_steps(self.cwd / out_dir) or not need_ckpt):
                    os.killpg(proc.pid, sig) if spec.group else proc.send_signal(sig)
                    signalled[0] = max(steps)
            if proc.poll() is None and time.perf_counter() - t0 > MAX_SECONDS:
                os.killpg(proc.pid, signal.SIGKILL) if spec.group else proc.kill()
            if proc.poll() is None:
                continue
            for f in out:
                f.close()
            if spec.after:
                extra.update(spec.after())
            self.done[name] = Result(name, proc.returncode, (self.cwd / f"{name}.stdout").read_text(),
                                     (self.cwd / f"{name}.stderr").read_text(), time.perf_counter() - t0,
                                     signalled[0], extra)
            del self.running[name]


def needs(*names):
    """Mark a test with the background runs it checks (the scheduler starts only those)."""
    def mark(fn):
        fn.needs = names
        return fn
    return mark


def work_dir(tmp_path_factory, name: str) -> Path:
    """A fresh working directory for a module's runs, holding corpus.txt."""
    work = tmp_path_factory.mktemp(name)
    (work / "corpus.txt").write_text(corpus_text(), encoding="utf-8")
    return work


def scheduled_runs(specs: dict[str, Spec], work: Path, request):
    """Body of a module's `runs` fixture: the scheduler while the module's tests run, closed after."""
    scheduler = start_runs(specs, work, request)
    yield scheduler
    scheduler.close()


def start_runs(specs: dict[str, Spec], work: Path, request) -> Scheduler:
    """A scheduler for the runs that the tests of request.module marked with @needs, and their deps."""
    env = {**os.environ, "FLAX_GPT_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
           "JAX_COMPILATION_CACHE_DIR": str(work / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    wanted = set()
    for item in request.session.items:
        if item.module is request.module:
            wanted.update(getattr(item.function, "needs", ()))
    while True:  # and everything those depend on
        more = {d for name in wanted for d in specs[name].deps} - wanted
        if not more:
            break
        wanted |= more
    return Scheduler(specs, wanted, work, env, slots=min(2, os.cpu_count() or 1))


def check_exact_resume(reference: Result, interrupted: Result, resumed: Result, out: Path) -> int:
    """The resumed run's metrics equal the uninterrupted (reference) run's step for step; returns the resume step."""
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resume_step = max(interrupted.extra["ckpts"])
    assert 0 < resume_step < LONG_STEPS, interrupted.extra["ckpts"]
    assert f"done: {LONG_STEPS - resume_step} steps" in resumed.stdout, resumed.stdout  # continued from there
    assert f"checkpoint {out.name}/checkpoints/{LONG_STEPS}" in resumed.stdout

    ref, got = read_records(reference_dir := out.parent / reference.extra["out"]), read_records(out)
    assert reference_dir.is_dir()
    # records before the checkpoint step are the interrupted process's own, kept as written
    kept = [r for r in interrupted.extra["records"] if r["step"] < resume_step]
    assert got[: len(kept)] == kept
    for key in ("loss", "grad_norm", "lr"):
        a = {r["step"]: r[key] for r in ref if key in r}
        b = {r["step"]: r[key] for r in got if key in r}
        assert sorted(b) == list(range(LONG_STEPS))
        # exact, measured: max |diff| 0.0 for every step's loss, grad_norm, lr and val loss (fp32 on CPU)
        assert b == a, (key, {s: (a[s], b[s]) for s in a if a[s] != b.get(s)})
    assert val_losses(got) == val_losses(ref)
    assert sorted(val_losses(got)) == [0, 5, 10, 15, 20]
    assert ckpt_steps(out)[-1] == LONG_STEPS
    return resume_step


def hellaswag_examples(n: int, seed: int = 0) -> list[dict]:
    """n HellaSwag-format examples of the corpus's words: contexts of 4-20 words, endings of 1-10."""
    rng = np.random.default_rng(seed)
    words = lambda k: " ".join(rng.choice(WORDS, size=k))  # noqa: E731
    return [{"ctx": words(rng.integers(4, 21)).capitalize(), "endings": [words(rng.integers(1, 11)) for _ in range(4)],
             "label": 0} for _ in range(n)]
