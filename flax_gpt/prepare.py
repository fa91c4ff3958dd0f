"""Tokenize a corpus of any size into GPT-2 token shards that `train.py --data DIR` reads.

    python -m flax_gpt.prepare fineweb-edu/sample/10BT --out edu_fineweb10B     # Parquet files as downloaded
    python -m flax_gpt.prepare books/ notes.jsonl.gz --out mydata --val-fraction 0.01
    python train.py --preset gpt2 --data edu_fineweb10B

SOURCEs: .txt files (a file is one document), directories (read recursively), JSON Lines (.jsonl, .jsonl.gz:
a document per line, its --text-field) and Parquet (.parquet: a document per row of the --text-field column),
mixed freely. Output: uint16 token shards of --shard-tokens tokens in build-nanogpt's format
(<name>_val_000000.npy, <name>_train_000001.npy, ...; every document starts with <|endoftext|>) and, written
last, manifest.json (sources with size and sha256, documents, tokens per shard, tokenizer, format version).

The validation split is the first --val-tokens tokens (default: the first shard, as build-nanogpt), or the
last --val-fraction of them; it never shares a token with the training split. Memory stays bounded whatever
the corpus: files are read in chunks of --chunk-bytes, a few chunks per process in flight, and shards go to
disk as they fill; chunks are tokenized on every core. A bad document (a JSON Lines line that is not JSON or
lacks the field, a null Parquet value, an empty or non-UTF-8 text file) stops the run naming the file and
line or row; with --skip-bad it is left out (a non-UTF-8 part of a large text file: the chunk holding it),
counted in manifest.json and reported. A killed or failed run keeps its finished shards: the same command
resumes after them, and the result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import functools
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Annotated

import numpy as np
import tyro

from flax_gpt import sources as src
from flax_gpt.errors import UserError, run_cli
from flax_gpt.files import atomic_write
from flax_gpt.shards import (JOURNAL, MANIFEST, PREPARE_FORMAT, SHARD_NAME, TOKEN_DTYPE, NpyWriter, npy_tokens,
                             shard_name)
from flax_gpt.tokenizer import EOT, get_encoding

FORMAT_VERSION = 1  # bump when the shards or manifest.json change meaning
PARALLEL_MIN_BYTES = 32 << 20  # smaller inputs are tokenized in this process: starting workers costs more
COPY_TOKENS = 1 << 24  # tokens per read when moving tokens between shards (the val carve)
MAX_EXAMPLES = 5  # bad documents quoted in manifest.json


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides the output bytes."""

    shard_tokens: int = 100_000_000
    val_tokens: int = 0  # > 0: the first val_tokens tokens are the val split
    val_fraction: float = 0.0  # otherwise: the last int(tokens * val_fraction) tokens
    text_field: str = "text"
    name: str = "tokens"


@dataclasses.dataclass
class Tokens:
    """A tokenized chunk."""

    index: int  # the chunk's index
    source: int
    tokens: np.ndarray  # (n,) uint16: each document's <|endoftext|> and tokens
    documents: int  # documents that start in the chunk
    bad: list[str]  # one line per bad document left out
    progress: int  # input bytes it accounts for


@dataclasses.dataclass
class Result:
    manifest: dict
    status: str  # "prepared", "resumed" (after some finished shards) or "unchanged" (out already held it)
    resumed_shards: int = 0
    seconds: float = 0.0


# ----------------------------------------------------------------------------- tokenizing (worker processes)


def tokenize_chunk(chunk: src.Chunk, text_field: str, skip_bad: bool) -> Tokens:
    """A chunk's documents as one token array; bad documents raise BadDocument unless skip_bad."""
    docs, bad = src.documents(chunk, text_field)
    if bad and not skip_bad:
        raise BadDocument(bad[0])
    enc, parts, eot = get_encoding(), [], np.array([EOT], np.uint32)
    for text, starts in docs:
        if starts:
            parts.append(eot)
        if text:
            parts.append(_encode(enc, text))
    tokens = np.concatenate(parts).astype(TOKEN_DTYPE) if parts else np.zeros(0, TOKEN_DTYPE)  # (n,)
    return Tokens(chunk.index, chunk.source, tokens, sum(s for _, s in docs), bad, chunk.progress)


def _encode(enc, text: str) -> np.ndarray:
    """encode_ordinary(text) as a uint32 array (no list of Python ints on the way)."""
    try:
        return enc.encode_to_numpy(text, disallowed_special=())
    except UnicodeEncodeError:  # lone surrogates (JSON "\ud800"): replaced, as encode_ordinary does
        return enc.encode_to_numpy(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"),
                                   disallowed_special=())


class BadDocument(UserError):
    """A document that cannot be read (its file and line or row are in the message)."""


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    get_encoding()


def tokenized(chunks: Iterator[src.Chunk], work, workers: int) -> Iterator[Tokens]:
    """work(chunk) of every chunk, in order: here, or in `workers` processes with 2 chunks each in flight."""
    if workers <= 1:
        yield from map(work, chunks)
        return
    pending = deque()
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)
    try:
        for chunk in chunks:
            pending.append(pool.submit(work, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise UserError("a tokenizer process died (killed, or out of memory?); run the same command again to resume "
                        "after the finished shards") from None
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def default_workers(sources: list[src.Source]) -> int:
    """One process per core, or none (this process) for inputs under PARALLEL_MIN_BYTES."""
    if sum(s.size for s in sources) < PARALLEL_MIN_BYTES:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def tokenize_paths(paths: list[Path], text_field: str = "text") -> np.ndarray:
    """(N,) uint16 tokens of the documents of paths, in memory (for evaluation texts; shards for corpora)."""
    sources = src.find_sources(paths)
    work = functools.partial(tokenize_chunk, text_field=text_field, skip_bad=False)
    chunks = src.read_chunks(sources, 1 << 20, text_field)
    parts = [t.tokens for t in tokenized(chunks, work, default_workers(sources))]
    return np.concatenate(parts) if parts else np.zeros(0, TOKEN_DTYPE)


# ----------------------------------------------------------------------------- the shard stream


class ShardSink:
    """Cuts the token stream into shards (the val split first when it is val_tokens) and keeps the journal,
    rewritten after every finished shard, from which a re-run resumes."""

    def __init__(self, out: Path, settings: Settings, journal: dict):
        self.out, self.settings, self.journal = out, settings, journal
        val_done = sum(s["tokens"] for s in journal["shards"] if s["split"] == "val")
        self.val_left = max(0, settings.val_tokens - val_done)
        self.writer, self.split, self.capacity = None, "train", 0

    def add(self, tokens: np.ndarray, chunk: int, skip: int, counters: dict) -> None:
        """Append tokens[skip:] of chunk `chunk`; counters: the totals before that chunk (a resume starts there)."""
        at = skip
        while at < len(tokens):
            if self.writer is None:
                self._open()
            n = min(len(tokens) - at, self.capacity - self.writer.count)
            self.writer.write(tokens[at : at + n])
            at += n
            if self.writer.count == self.capacity:
                self._close({"chunk": chunk, "skip": at, "counters": copy.deepcopy(counters)})

    def finish(self, counters: dict) -> None:
        """Close the last shard and mark the stream complete."""
        if self.writer is not None and self.writer.count:
            self._close({"chunk": -1, "skip": 0, "counters": copy.deepcopy(counters)}, streamed=True)
        else:
            self.abort()
            self.journal.update(streamed=True, resume={"chunk": -1, "skip": 0, "counters": counters})
            write_json(self.out / JOURNAL, self.journal)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None

    def _open(self) -> None:
        self.split = "val" if self.val_left else "train"
        self.capacity = min(self.settings.shard_tokens, self.val_left) if self.val_left else self.settings.shard_tokens
        name = shard_name(self.settings.name, self.split, len(self.journal["shards"]))
        self.writer = NpyWriter(self.out / name)

    def _close(self, resume: dict, streamed: bool = False) -> None:
        path = self.writer.close()
        if self.split == "val":
            self.val_left -= self.writer.count
        self.journal["shards"].append({"file": path.name, "split": self.split, "tokens": self.writer.count})
        self.journal.update(resume=resume, streamed=streamed)
        write_json(self.out / JOURNAL, self.journal)  # after the rename: a listed shard is always complete
        self.writer = None


def carve_val(out: Path, shards: list[dict], n_val: int, name: str) -> list[dict]:
    """Move the last n_val tokens of the train shards into val shards; returns the shards as they end up.

    Shards wholly past the cut are renamed train -> val; the one holding the cut gives its tail to a new
    val shard (same number), then is rewritten with its head. Every step is skipped when already done,
    so a run killed here is finished by the next.
    """
    cut, start, result = sum(s["tokens"] for s in shards) - n_val, 0, []
    for index, shard in enumerate(shards):
        end, path = start + shard["tokens"], out / shard["file"]
        val = out / shard_name(name, "val", index)
        if end <= cut:
            result.append(shard)
        elif start >= cut:
            if path.exists():
                os.replace(path, val)
            result.append({"file": val.name, "split": "val", "tokens": shard["tokens"]})
        else:
            head = cut - start
            if not val.exists():
                _copy_tokens(npy_tokens(path)[head:], val)
            if len(npy_tokens(path)) != head:
                _copy_tokens(npy_tokens(path)[:head], path)
            result += [{"file": path.name, "split": "train", "tokens": head},
                       {"file": val.name, "split": "val", "tokens": shard["tokens"] - head}]
        start = end
    return result


def _copy_tokens(tokens: np.ndarray, dest: Path) -> None:
    """Write tokens (a memory-mapped slice, read a block at a time) as the .npy file dest."""
    writer = NpyWriter(dest)
    try:
        for i in range(0, len(tokens), COPY_TOKENS):
            writer.write(tokens[i : i + COPY_TOKENS])
    except BaseException:
        writer.abort()
        raise
    writer.close()


# ----------------------------------------------------------------------------- the run


def prepare(paths: list[Path], out: Path, settings: Settings = Settings(), *, chunk_bytes: int = 1 << 20,
            skip_bad: bool = False, workers: int | None = None, overwrite: bool = False, owned: bool = False,
            progress: bool | None = True, require_splits: bool = True) -> Result:
    """Tokenize the documents of paths into shards in out (see the module docstring).

    owned: out belongs to the caller (a cache): anything in it may be replaced and a concurrent prepare
    of it is waited for. require_splits: an empty train or val split is an error.
    """
    t0 = time.perf_counter()
    sources = src.find_sources(paths)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out, wait=owned):
        fingerprint = {"version": FORMAT_VERSION, "settings": dataclasses.asdict(settings), "chunk_bytes": chunk_bytes,
                       "sources": [_stat_record(s) for s in sources]}
        manifest = _finished(out, sources, settings, replace=overwrite or owned, owned=owned)
        if manifest is not None:
            return Result(manifest, "unchanged", seconds=time.perf_counter() - t0)
        journal = _journal(out, fingerprint, replace=overwrite or owned)
        resumed = len(journal["shards"])
        hashes = _Hasher([s.path for s in sources])  # beside the tokenizing
        try:
            if not journal.get("streamed"):
                _stream(out, sources, settings, journal, chunk_bytes, skip_bad,
                        workers or default_workers(sources), progress)
        except BaseException:
            hashes.stop.set()
            if not journal["shards"]:  # nothing worth resuming: leave no trace
                _remove(out, created)
            raise
        shard_list = journal["shards"]
        total = sum(s["tokens"] for s in shard_list)
        if settings.val_fraction:
            shard_list = carve_val(out, shard_list, int(total * settings.val_fraction), settings.name)
        counters = journal["resume"]["counters"]
        manifest = _manifest(settings, sources, hashes.result(), counters, shard_list)
        if require_splits and not (manifest["train_tokens"] and manifest["val_tokens"]):
            _remove(out, created)
            val = f"--val-tokens {settings.val_tokens}" if settings.val_tokens else f"--val-fraction {settings.val_fraction}"
            raise UserError(f"the sources hold {total} tokens: {manifest['train_tokens']} train and "
                            f"{manifest['val_tokens']} val with {val}; both splits need tokens: change {val.split()[0]} "
                            "or add text")
        write_json(out / MANIFEST, manifest)
        (out / JOURNAL).unlink()
    return Result(manifest, "resumed" if resumed else "prepared", resumed, time.perf_counter() - t0)


def _stream(out: Path, sources: list[src.Source], settings: Settings, journal: dict, chunk_bytes: int,
            skip_bad: bool, workers: int, progress: bool | None) -> None:
    """Tokenize from the journal's resume point on, into shards; leaves the journal marked streamed."""
    from tqdm import tqdm

    resume = journal.get("resume") or {"chunk": 0, "skip": 0, "counters": _zero_counters(len(sources))}
    counters = copy.deepcopy(resume["counters"])
    sink = ShardSink(out, settings, journal)
    bar = tqdm(total=sum(s.size for s in sources), unit="B", unit_scale=True, unit_divisor=1024, desc="tokenizing",
               disable=None if progress is None else not progress, dynamic_ncols=True, file=sys.stderr)
    t0, n_tokens = time.perf_counter(), 0

    def todo(chunks):
        for chunk in chunks:
            if chunk.index < resume["chunk"]:
                bar.update(chunk.progress)  # done by the run being resumed: read again, not tokenized
            else:
                yield chunk

    work = functools.partial(tokenize_chunk, text_field=settings.text_field, skip_bad=skip_bad)
    chunks = todo(src.read_chunks(sources, chunk_bytes, settings.text_field))
    try:
        for t in tokenized(chunks, work, workers):
            sink.add(t.tokens, t.index, resume["skip"] if t.index == resume["chunk"] else 0, counters)
            _count(counters, t)
            n_tokens += len(t.tokens)
            bar.update(t.progress)
            bar.set_postfix_str(f"{n_tokens / (time.perf_counter() - t0):,.0f} tok/s, {len(journal['shards'])} shards",
                                refresh=False)
        sink.finish(counters)
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()


def _zero_counters(n_sources: int) -> dict:
    return {"documents": [0] * n_sources, "tokens": [0] * n_sources, "skipped": [0] * n_sources, "examples": []}


def _count(counters: dict, t: Tokens) -> None:
    counters["documents"][t.source] += t.documents
    counters["tokens"][t.source] += len(t.tokens)
    counters["skipped"][t.source] += len(t.bad)
    counters["examples"] += t.bad[: MAX_EXAMPLES - len(counters["examples"])]


def _manifest(settings: Settings, sources: list[src.Source], hashes: list[str], counters: dict,
              shard_list: list[dict]) -> dict:
    split_tokens = {s: sum(x["tokens"] for x in shard_list if x["split"] == s) for s in ("train", "val")}
    return {
        "format": PREPARE_FORMAT, "version": FORMAT_VERSION, "tokenizer": "gpt2", "dtype": "uint16", "eot": EOT,
        "settings": dataclasses.asdict(settings),
        "sources": [{**_stat_record(s), "sha256": h, "documents": d, "tokens": t, "skipped": k}
                    for s, h, d, t, k in zip(sources, hashes, counters["documents"], counters["tokens"],
                                             counters["skipped"], strict=True)],
        "documents": sum(counters["documents"]), "skipped_documents": sum(counters["skipped"]),
        "skipped_examples": counters["examples"],
        "tokens": sum(split_tokens.values()), "train_tokens": split_tokens["train"], "val_tokens": split_tokens["val"],
        "shards": sorted(shard_list, key=lambda x: (x["split"], x["file"])),
    }


def _stat_record(s: src.Source) -> dict:
    return {"path": str(s.path.resolve()), "format": s.format, "size": s.size, "mtime_ns": s.mtime_ns}


def _sha256(path: Path, stop: threading.Event | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while (block := f.read(1 << 24)) and not (stop and stop.is_set()):
            digest.update(block)
    return digest.hexdigest()


class _Hasher(threading.Thread):
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


# ----------------------------------------------------------------------------- the output directory


def _finished(out: Path, sources: list[src.Source], settings: Settings, replace: bool, owned: bool) -> dict | None:
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
        if [_stat_record(s) for s in sources] != [_stat_only(r) for r in manifest["sources"]]:
            manifest["sources"] = [{**r, **_stat_record(s)} for r, s in zip(manifest["sources"], sources)]
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
    if [_stat_record(s) for s in sources] == [_stat_only(r) for r in old]:
        return True
    same_files = [(str(s.path.resolve()), s.size) for s in sources] == [(r["path"], r["size"]) for r in old]
    return same_files and all(_sha256(s.path) == r["sha256"] for s, r in zip(sources, old))


def _stat_only(record: dict) -> dict:
    return {k: record.get(k) for k in ("path", "format", "size", "mtime_ns")}


def _journal(out: Path, fingerprint: dict, replace: bool) -> dict:
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


def _remove(out: Path, created: bool) -> None:
    """Delete prepare's files in out, and out itself if this run created it."""
    _clear(out, everything=False)
    if created:
        out.rmdir()


@contextlib.contextmanager
def _locked(out: Path, wait: bool):
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


# ----------------------------------------------------------------------------- CLI


@dataclasses.dataclass
class PrepareConfig:
    """Tokenize .txt / .jsonl / .jsonl.gz / .parquet files into GPT-2 token shards for train.py --data."""

    sources: tyro.conf.Positional[Annotated[list[str], tyro.conf.arg(
        metavar="SOURCE...", help=".txt, .jsonl, .jsonl.gz, .parquet files, or directories of them (read recursively)")]]
    out: str  # directory for the shards and manifest.json; an unfinished prepare in it is resumed
    shard_tokens: int = 100_000_000  # tokens per shard file (build-nanogpt: 100M)
    val_tokens: int | None = None  # the first N tokens form the val split; default: the first shard
    val_fraction: float | None = None  # instead of --val-tokens: the last fraction of the tokens, e.g. 0.01
    text_field: str = "text"  # the JSON Lines field / Parquet column holding each document's text
    name: str = "tokens"  # shard names: <name>_val_000000.npy, <name>_train_000001.npy, ...
    skip_bad: bool = False  # leave bad documents out (counted in manifest.json) instead of stopping at the first
    workers: int | None = None  # tokenizer processes; default: one per core (inputs under 32 MB: none)
    chunk_bytes: int = 1 << 20  # input bytes per unit of tokenizer work
    overwrite: bool = False  # replace an earlier prepare's output in --out (never other files)
    progress: bool = True  # show a progress bar (bytes read, tokens/s, ETA)
    debug: bool = False  # show tracebacks instead of one-line errors


def settings_of(cfg: PrepareConfig) -> Settings:
    """The checked Settings of the command line."""
    if not cfg.sources:
        raise UserError("name at least one SOURCE: a .txt, .jsonl, .jsonl.gz or .parquet file, or a directory of them")
    if cfg.shard_tokens < 1 or cfg.chunk_bytes < 1 or (cfg.workers is not None and cfg.workers < 1):
        raise UserError("--shard-tokens, --chunk-bytes and --workers must be >= 1")
    if cfg.val_tokens is not None and cfg.val_fraction is not None:
        raise UserError("pass --val-tokens or --val-fraction, not both")
    if cfg.val_fraction is not None and not 0 < cfg.val_fraction < 1:
        raise UserError(f"--val-fraction must be in (0, 1), got {cfg.val_fraction}")
    if cfg.val_tokens is not None and cfg.val_tokens < 1:
        raise UserError(f"--val-tokens must be >= 1, got {cfg.val_tokens}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", cfg.name) or re.search(r"(?i)train|val", cfg.name):
        raise UserError(f"--name {cfg.name!r}: use letters, digits, '.' and '-', without 'train' or 'val'")
    val_tokens = 0 if cfg.val_fraction is not None else cfg.val_tokens or cfg.shard_tokens
    return Settings(cfg.shard_tokens, val_tokens, cfg.val_fraction or 0.0, cfg.text_field, cfg.name)


def run(cfg: PrepareConfig) -> Result:
    settings = settings_of(cfg)
    try:
        return prepare([Path(s).expanduser() for s in cfg.sources], Path(cfg.out).expanduser(), settings,
                       chunk_bytes=cfg.chunk_bytes, skip_bad=cfg.skip_bad, workers=cfg.workers,
                       overwrite=cfg.overwrite, progress=cfg.progress)
    except BadDocument as e:
        raise UserError(f"{e}; fix it, or pass --skip-bad to leave bad documents out (finished shards are kept: "
                        "the same command resumes)") from None


def summary(cfg: PrepareConfig, result: Result) -> str:
    m = result.manifest
    head = {"unchanged": "already prepared, nothing to do", "prepared": f"done in {result.seconds:.0f} s",
            "resumed": f"done in {result.seconds:.0f} s, resumed after {result.resumed_shards} finished shards"}
    return (f"{cfg.out}: {head[result.status]}; {m['tokens']:,} tokens ({m['train_tokens']:,} train, "
            f"{m['val_tokens']:,} val) in {len(m['shards'])} shards, {m['documents']:,} documents from "
            f"{len(m['sources'])} files; train with: python train.py --data {cfg.out}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = tyro.cli(PrepareConfig, args=argv, description=__doc__, prog="python -m flax_gpt.prepare")
    try:
        result, code = run_cli(lambda: run(cfg), cfg.debug)
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; run the same command again to resume", file=sys.stderr)
        return 130
    if code:
        return code
    print(summary(cfg, result))
    skipped = result.manifest["skipped_documents"]
    if skipped:
        print(f"warning: left out {skipped} bad documents (listed by file in {MANIFEST}); the first: "
              f"{result.manifest['skipped_examples'][0]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
