"""prepare's output directory: what decides its bytes (Settings), whether it already holds them (its manifest and
the sources' stats or hashes), the journal an unfinished run resumes from, the lock that lets one prepare write
it at a time, and clearing it. Nothing here deletes a file prepare did not write, unless the directory is owned
(a cache)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

from flax_gpt import sources as src
from flax_gpt.errors import UserError
from flax_gpt.files import atomic_write
from flax_gpt.shards import JOURNAL, MANIFEST, SHARD_NAME, npy_tokens

FORMAT_VERSION = 1  # bump when the shards or manifest.json change meaning


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides the output bytes."""

    shard_tokens: int = 100_000_000
    val_tokens: int = 0  # > 0: the first val_tokens tokens are the val split
    val_fraction: float = 0.0  # otherwise: the last int(tokens * val_fraction) tokens
    text_field: str = "text"
    name: str = "tokens"


# ----------------------------------------------------------------------------- the sources, as the output records them


def stat_record(s: src.Source) -> dict:
    """A source as the fingerprint and manifest.json record it: resolved path, format, size, mtime."""
    return {"path": str(s.path.resolve()), "format": s.format, "size": s.size, "mtime_ns": s.mtime_ns}


def _sha256(path: Path, stop: threading.Event | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while (block := f.read(1 << 24)) and not (stop and stop.is_set()):
            digest.update(block)
    return digest.hexdigest()


class Hasher(threading.Thread):
    """sha256 of each file, computed in a background thread (hashlib lets the tokenizing go on meanwhile)."""

    def __init__(self, paths: list[Path]):
        super().__init__(daemon=True)
        self.paths, self.stop, self.hashes, self.error = paths, threading.Event(), [], None
        self.start()

    def run(self) -> None:
        try:
            self.hashes = [_sha256(p, self.stop) for p in self.paths]
        except OSError as e:
            self.error = UserError(f"cannot read {e.filename}: {e.strerror}")

    def result(self) -> list[str]:
        self.join()
        if self.error:
            raise self.error
        return self.hashes


# ----------------------------------------------------------------------------- the directory


def finished_manifest(out: Path, sources: list[src.Source], settings: Settings, replace: bool,
                      owned: bool) -> dict | None:
    """out's manifest if it already holds this output (sources unchanged: same stats, else same bytes); else None,
    after checking that out holds nothing but prepare output (or clearing it, when owned)."""
    manifest, journal = read_json(out / MANIFEST), read_json(out / JOURNAL)
    foreign = [p.name for p in sorted(out.iterdir()) if not (manifest or journal) or not _is_ours(p.name)]
    if foreign and not owned:
        raise UserError(f"--out {out} holds files that prepare did not write ({', '.join(foreign[:3])}); "
                        "pass a new or empty directory")
    if manifest is None:
        if owned and journal is None:
            _clear(out, everything=True)  # an old cache layout, or nothing
        return None
    if _same_output(manifest, sources, settings):
        (out / JOURNAL).unlink(missing_ok=True)  # a run killed after writing the manifest
        if [stat_record(s) for s in sources] != [_stat_only(r) for r in manifest["sources"]]:
            manifest["sources"] = [{**r, **stat_record(s)} for r, s in zip(manifest["sources"], sources)]
            write_json(out / MANIFEST, manifest)  # touched, same bytes: remember the new times
        return manifest
    if not replace:
        raise UserError(f"--out {out} holds shards prepared from other sources or settings; pass --overwrite to "
                        "replace them, or another --out")
    _clear(out, everything=owned)
    return None


def _same_output(manifest: dict, sources: list[src.Source], settings: Settings) -> bool:
    old = manifest.get("sources", [])
    if manifest.get("version") != FORMAT_VERSION or manifest.get("settings") != dataclasses.asdict(settings):
        return False
    if [stat_record(s) for s in sources] == [_stat_only(r) for r in old]:
        return True
    same_files = [(str(s.path.resolve()), s.size) for s in sources] == [(r["path"], r["size"]) for r in old]
    return same_files and all(_sha256(s.path) == r["sha256"] for s, r in zip(sources, old))


def _stat_only(record: dict) -> dict:
    return {k: record.get(k) for k in ("path", "format", "size", "mtime_ns")}


def open_journal(out: Path, fingerprint: dict, replace: bool) -> dict:
    """The journal to go on from: the unfinished run's when it matches, else a fresh one (written at once)."""
    journal = read_json(out / JOURNAL)
    if journal is not None and journal.get("fingerprint") != fingerprint:
        if journal.get("shards") and not replace:
            raise UserError(f"--out {out} holds an unfinished prepare of other sources or settings; run that "
                            "command again to finish it, or pass --overwrite to start over")
        _clear(out, everything=False)
        journal = None
    if journal is None:
        journal = {"fingerprint": fingerprint, "shards": [], "streamed": False}
        write_json(out / JOURNAL, journal)
        return journal
    for shard in journal["shards"] if not journal.get("streamed") else []:
        path = out / shard["file"]
        if not path.is_file() or len(npy_tokens(path)) != shard["tokens"]:
            raise UserError(f"{path}, a finished shard of the unfinished prepare in {out}, is missing or changed; "
                            "pass --overwrite to start over")
    if not journal.get("streamed"):  # files of the shard in progress when the run stopped
        listed = {s["file"] for s in journal["shards"]}
        for p in out.iterdir():
            if _is_ours(p.name) and p.name not in listed | {JOURNAL, MANIFEST}:
                p.unlink()
    return journal


def _is_ours(name: str) -> bool:
    return name in (MANIFEST, JOURNAL) or bool(SHARD_NAME.match(name.removesuffix(".tmp")))


def _clear(out: Path, everything: bool) -> None:
    """Delete prepare's files in out (everything: all of out's contents), the manifest first."""
    (out / MANIFEST).unlink(missing_ok=True)
    for p in out.iterdir():
        if everything or _is_ours(p.name):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def remove_output(out: Path, created: bool) -> None:
    """Delete prepare's files in out, and out itself if this run created it."""
    _clear(out, everything=False)
    if created:
        out.rmdir()


@contextlib.contextmanager
def locked(out: Path, wait: bool):
    """Hold an exclusive lock on the directory out: one prepare writes it at a time."""
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise UserError(f"another prepare is writing {out}; wait for it to finish, or pass another --out") from None
        yield
    finally:
        os.close(fd)


def read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_json(path: Path, value: dict) -> None:
    atomic_write(path, json.dumps(value, indent=1) + "\n")
