"""prepare's token stream into shards: ShardSink cuts it into <name>_{val,train}_NNNNNN.npy files, each complete
before the journal lists it, and carve_val moves the last tokens of the train shards into val shards (for
--val-fraction), every step of it skipped when already done."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np

from flax_gpt.prepare_output import Settings, write_json
from flax_gpt.shards import JOURNAL, NpyWriter, npy_tokens, shard_name

COPY_TOKENS = 1 << 24  # tokens per read when moving tokens between shards (the val carve)


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
