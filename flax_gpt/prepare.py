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

import copy
import dataclasses
import functools
import re
import sys
import time
from pathlib import Path
from typing import Annotated

import tyro
from tqdm import tqdm

from flax_gpt import sources as src
from flax_gpt.errors import UserError, run_cli
from flax_gpt.prepare_output import (FORMAT_VERSION, Hasher, Settings, finished_manifest, locked, open_journal,
                                     remove_output, stat_record, write_json)
from flax_gpt.shard_writer import ShardSink, carve_val
from flax_gpt.shards import JOURNAL, MANIFEST, PREPARE_FORMAT
from flax_gpt.tokenize_chunks import BadDocument, Tokens, default_workers, tokenize_chunk, tokenized
from flax_gpt.tokenizer import EOT

MAX_EXAMPLES = 5  # bad documents quoted in manifest.json


@dataclasses.dataclass
class Result:
    manifest: dict
    status: str  # "prepared", "resumed" (after some finished shards) or "unchanged" (out already held it)
    resumed_shards: int = 0
    seconds: float = 0.0


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
    with locked(out, wait=owned):
        fingerprint = {"version": FORMAT_VERSION, "settings": dataclasses.asdict(settings), "chunk_bytes": chunk_bytes,
                       "sources": [stat_record(s) for s in sources]}
        manifest = finished_manifest(out, sources, settings, replace=overwrite or owned, owned=owned)
        if manifest is not None:
            return Result(manifest, "unchanged", seconds=time.perf_counter() - t0)
        journal = open_journal(out, fingerprint, replace=overwrite or owned)
        resumed = len(journal["shards"])
        hashes = Hasher([s.path for s in sources])  # beside the tokenizing
        try:
            if not journal.get("streamed"):
                _stream(out, sources, settings, journal, chunk_bytes, skip_bad,
                        workers or default_workers(sources), progress)
        except BaseException:
            hashes.stop.set()
            if not journal["shards"]:  # nothing worth resuming: leave no trace
                remove_output(out, created)
            raise
        shard_list = journal["shards"]
        total = sum(s["tokens"] for s in shard_list)
        if settings.val_fraction:
            shard_list = carve_val(out, shard_list, int(total * settings.val_fraction), settings.name)
        counters = journal["resume"]["counters"]
        manifest = _manifest(settings, sources, hashes.result(), counters, shard_list)
        if require_splits and not (manifest["train_tokens"] and manifest["val_tokens"]):
            remove_output(out, created)
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
        "sources": [{**stat_record(s), "sha256": h, "documents": d, "tokens": t, "skipped": k}
                    for s, h, d, t, k in zip(sources, hashes, counters["documents"], counters["tokens"],
                                             counters["skipped"], strict=True)],
        "documents": sum(counters["documents"]), "skipped_documents": sum(counters["skipped"]),
        "skipped_examples": counters["examples"],
        "tokens": sum(split_tokens.values()), "train_tokens": split_tokens["train"], "val_tokens": split_tokens["val"],
        "shards": sorted(shard_list, key=lambda x: (x["split"], x["file"])),
    }


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
