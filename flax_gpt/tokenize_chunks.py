"""Documents to GPT-2 tokens, a chunk at a time: in this process, or in worker processes (one per core) with a
few chunks each in flight and the results in the chunks' order. prepare streams them into shards; tokenize_paths
keeps a text's tokens in memory (evaluate's --data)."""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from flax_gpt import sources as src
from flax_gpt.errors import UserError
from flax_gpt.shards import TOKEN_DTYPE
from flax_gpt.tokenizer import EOT, get_encoding

PARALLEL_MIN_BYTES = 32 << 20  # smaller inputs are tokenized in this process: starting workers costs more


@dataclasses.dataclass
class Tokens:
    """A tokenized chunk."""

    index: int  # the chunk's index
    source: int
    tokens: np.ndarray  # (n,) uint16: each document's <|endoftext|> and tokens
    documents: int  # documents that start in the chunk
    bad: list[str]  # one line per bad document left out
    progress: int  # input bytes it accounts for


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
