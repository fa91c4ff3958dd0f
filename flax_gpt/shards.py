"""Token files on disk: this project's prepare output and the formats of build-nanogpt, nanoGPT and llm.c,
each memory-mapped and read as one token stream per split.

    open_token_dir  a directory -> TokenData (train / val streams), recognised by its files' names and headers
    TokenStream     files seen as one (N,) uint16 stream; slices cross file boundaries
    NpyWriter       appends tokens to a .npy file that becomes visible, complete, only when closed

Formats read:
    prepare         manifest.json + <name>_{train,val}_NNNNNN.npy (python -m flax_gpt.prepare)
    build-nanogpt   *_train_*.npy + *_val_*.npy (fineweb.py: uint16 .npy shards)
    nanoGPT         train.bin + val.bin (raw uint16)
    llm.c           *train*.bin + *val*.bin with a 256-int32 header (magic 20240520, version 1, token count)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np

from flax_gpt.errors import UserError

TOKEN_DTYPE = np.uint16  # GPT-2's 50257 ids fit in 16 bits
MANIFEST = "manifest.json"  # written last by prepare: its presence means the directory is complete
JOURNAL = "prepare-progress.json"  # present while a prepare is unfinished (killed or failed)
PREPARE_FORMAT = "flax-gpt token shards"
LLMC_MAGIC, LLMC_VERSION, LLMC_HEADER_INTS = 20240520, 1, 256  # llm.c dev/data/data_common.py, gpt-2 tokens
LLMC_LLAMA3_MAGIC = 20240801  # llm.c's uint32 llama-3 tokens
FORMATS = ("prepare output (manifest.json), build-nanogpt *_train_*.npy + *_val_*.npy, nanoGPT train.bin + val.bin, "
           "llm.c *_train_*.bin + *_val_*.bin")
SPLITS = ("train", "val")


@dataclasses.dataclass
class TokenData:
    """Train / val token streams of a dataset and a description of where they came from."""

    train: TokenStream  # (N_train,) uint16
    val: TokenStream  # (N_val,) uint16
    meta: dict  # prepare's manifest, or {"format": ..., "shards": ...} for other formats
    path: Path  # the directory holding the token files


class TokenStream:
    """Token files read as one (N,) uint16 stream without loading them: stream[a:b] copies just those tokens."""

    dtype = np.dtype(TOKEN_DTYPE)

    def __init__(self, parts: list[np.ndarray], names: list[str] | None = None):
        self.parts = parts  # memory-mapped (n_i,) uint16 arrays, in stream order
        self.names = names or [f"part {i}" for i in range(len(parts))]
        self.starts = np.cumsum([0] + [len(p) for p in parts])  # (n_parts + 1,) first stream index of each part

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a TokenStream is read by contiguous slices: stream[start:stop]")
        start, stop, _ = key.indices(len(self))
        out, i = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:  # copy from each file the window overlaps
            lo, hi = start - self.starts[i], min(stop, self.starts[i + 1]) - self.starts[i]
            out.append(np.asarray(self.parts[i][lo:hi]))
            start, i = self.starts[i] + hi, i + 1
        return np.concatenate(out) if out else np.zeros(0, TOKEN_DTYPE)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        tokens = self[0 : len(self)]  # reads every file: for small data and tests
        return tokens if dtype is None else tokens.astype(dtype)

    def where(self, index: int) -> str:
        """'file, token i' of a stream index, for error messages."""
        i = int(np.searchsorted(self.starts, index, side="right")) - 1
        return f"{self.names[i]}, token {index - self.starts[i]}"


# ----------------------------------------------------------------------------- writing .npy


class NpyWriter:
    """A 1-D uint16 .npy file written in pieces to `<path>.tmp` and renamed to path, complete, on close().

    The header is written for 0 tokens and rewritten with the count at close: numpy pads a 1-D header
    so that any count fits in the same bytes, and the result equals np.save of the same tokens.
    """

    def __init__(self, path: Path):
        self.path, self.tmp, self.count = path, path.with_name(path.name + ".tmp"), 0
        self.file = open(self.tmp, "wb")
        _npy_header(self.file, 0)

    def write(self, tokens: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE).data)
        self.count += len(tokens)

    def close(self) -> Path:
        self.file.seek(0)
        _npy_header(self.file, self.count)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the unfinished file."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _npy_header(f, n: int) -> None:
    np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(TOKEN_DTYPE).str, "fortran_order": False,
                                             "shape": (n,)})


def npy_tokens(path: Path) -> np.ndarray:
    """(n,) uint16 tokens of a 1-D .npy file, memory-mapped; a UserError if it is not one."""
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:  # a cut-short copy: "mmap length is greater than file size"
        raise UserError(f"{path} is truncated or not a .npy file ({e}); copy or prepare it again") from None
    if tokens.dtype != TOKEN_DTYPE or tokens.ndim != 1:
        raise UserError(f"{path} holds a {tokens.dtype} array of shape {tokens.shape}, not 1-D uint16 GPT-2 tokens")
    return tokens


# ----------------------------------------------------------------------------- reading a directory


def open_token_dir(path: Path) -> TokenData | None:
    """The token data in directory path, recognised by name and content; None if it holds no token files."""
    if (path / MANIFEST).is_file():  # written last: complete even if a journal was left behind
        return _open_prepared(path)
    if (path / JOURNAL).exists():
        raise UserError(f"{path} is an unfinished prepare (killed or failed, no {MANIFEST}); re-run the same "
                        "`python -m flax_gpt.prepare` command to finish it")
    npys = _split_files(path, ".npy")
    if npys["train"] or npys["val"]:
        return _token_data(path, "build-nanogpt", {s: [(f, npy_tokens(f)) for f in files] for s, files in npys.items()})
    bins = _split_files(path, ".bin")
    if bins["train"] or bins["val"]:
        return _token_data(path, *_open_bins(path, bins))
    return None


def _open_prepared(path: Path) -> TokenData:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        shards = manifest["shards"]
        assert manifest["format"] == PREPARE_FORMAT and manifest["tokenizer"] == "gpt2"
    except (ValueError, KeyError, TypeError, AssertionError):
        raise UserError(f"{path / MANIFEST} is not a flax_gpt.prepare manifest; prepare the data again") from None
    files = {s: [] for s in SPLITS}
    for shard in shards:
        f = path / shard["file"]
        if not f.is_file():
            raise UserError(f"{f} is missing (listed in {path / MANIFEST}); copy the whole directory or prepare again")
        tokens = npy_tokens(f)
        if len(tokens) != shard["tokens"]:
            raise UserError(f"{f} holds {len(tokens)} tokens, {MANIFEST} says {shard['tokens']}; prepare again")
        files[shard["split"]].append((f, tokens))
    return _token_data(path, "prepare", files, manifest)


def _split_files(path: Path, suffix: str) -> dict[str, list[Path]]:
    """{split: files} of path whose names end in suffix and hold the word 'train' or 'val', sorted by name."""
    names = sorted(p.name for p in path.iterdir() if p.name.endswith(suffix) and p.is_file())
    return {split: [path / n for n in names if re.search(rf"(?<![a-zA-Z]){split}(?![a-zA-Z])", n.removesuffix(suffix))]
            for split in SPLITS}


def _open_bins(path: Path, bins: dict[str, list[Path]]) -> tuple[str, dict]:
    """('nanoGPT' or 'llm.c', {split: [(file, tokens)]}) of the .bin files of a directory."""
    if (path / "meta.pkl").exists():
        raise UserError(f"{path} holds nanoGPT character-level data (meta.pkl: its own vocabulary), not GPT-2 tokens; "
                        "pass its input.txt as --data to tokenize it with GPT-2's BPE")
    files, kinds = {}, set()
    for split, paths in bins.items():
        files[split] = []
        for f in paths:
            kind, tokens = _read_bin(f)
            kinds.add(kind)
            files[split].append((f, tokens))
    if len(kinds) > 1:
        raise UserError(f"{path} mixes nanoGPT raw .bin files and llm.c .bin shards; keep one format per directory")
    return kinds.pop(), files


def _read_bin(f: Path) -> tuple[str, np.ndarray]:
    """('llm.c', tokens) for a file with llm.c's header, ('nanoGPT', tokens) for a raw train.bin / val.bin."""
    size = f.stat().st_size
    header = np.fromfile(f, dtype="<i4", count=LLMC_HEADER_INTS) if size >= 4 * LLMC_HEADER_INTS else None
    if header is not None and header[0] == LLMC_MAGIC:
        if header[1] != LLMC_VERSION:
            raise UserError(f"{f}: llm.c header version {header[1]}, only version {LLMC_VERSION} (GPT-2 tokens) is read")
        count, have = int(header[2]), (size - 4 * LLMC_HEADER_INTS) // 2
        if have != count:
            raise UserError(f"{f}: its llm.c header says {count} tokens, the file holds {have}; copy or prepare it again")
        return "llm.c", _memmap(f, 4 * LLMC_HEADER_INTS, count)
    if header is not None and header[0] == LLMC_LLAMA3_MAGIC:
        raise UserError(f"{f} is an llm.c llama-3 shard (uint32 tokens of another vocabulary), not GPT-2 tokens")
    if f.name not in ("train.bin", "val.bin"):
        raise UserError(f"{f} has no llm.c header (magic {LLMC_MAGIC}) and is not nanoGPT's train.bin / val.bin; "
                        f"token directories hold one of: {FORMATS}")
    if size % 2:
        raise UserError(f"{f} has an odd byte count ({size}): not raw uint16 tokens (nanoGPT's train.bin / val.bin)")
    return "nanoGPT", _memmap(f, 0, size // 2)


def _memmap(f: Path, offset: int, n: int) -> np.ndarray:
    """(n,) uint16 tokens of f from byte offset, memory-mapped read-only (numpy cannot map 0 bytes)."""
    return np.memmap(f, dtype=TOKEN_DTYPE, mode="r", offset=offset, shape=(n,)) if n else np.zeros(0, TOKEN_DTYPE)


def _token_data(path: Path, fmt: str, files: dict[str, list[tuple[Path, np.ndarray]]], meta: dict | None = None):
    for split in SPLITS:
        if not files[split] and meta is None:  # a manifest may list an empty split (a cache with no val)
            other = "val" if split == "train" else "train"
            raise UserError(f"{path} holds {fmt} {other} files but no {split} file (a name with '{split}' in it); "
                            "both splits are needed")
    streams = {s: TokenStream([t for _, t in fs], [f.name for f, _ in fs]) for s, fs in files.items()}
    meta = meta or {"format": fmt, "shards": [{"file": f.name, "split": s, "tokens": len(t)}
                                              for s in SPLITS for f, t in files[s]]}
    return TokenData(streams["train"], streams["val"], meta, path)


SHARD_NAME = re.compile(r"^(?P<name>.+)_(?P<split>train|val)_(?P<index>\d{6})\.npy$")


def shard_name(name: str, split: str, index: int) -> str:
    """build-nanogpt's shard file name: <name>_<split>_<index:06d>.npy."""
    return f"{name}_{split}_{index:06d}.npy"
