"""Token directories in every format users have (build-nanogpt .npy, nanoGPT .bin, llm.c .bin, prepare output),
read memory-mapped as one stream per split, and batches that cross file boundaries."""

import json
import os

import numpy as np
import pytest

from flax_gpt import data, shards
from flax_gpt.data import DataLoader, eval_batches
from flax_gpt.errors import UserError
from flax_gpt.shards import TokenStream, open_token_dir
from flax_gpt.tokenizer import N_VOCAB


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAX_GPT_CACHE", str(tmp_path / "cache"))


def tokens_of(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, N_VOCAB, n).astype(np.uint16)


def llmc_write(path, tokens, magic=shards.LLMC_MAGIC, version=1, count=None):
    """llm.c's dev/data/data_common.py write_datafile: 256 int32 header (magic, version, count), uint16 tokens."""
    header = np.zeros(256, dtype=np.int32)
    header[:3] = magic, version, len(tokens) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(tokens, np.uint16).tobytes())


def write_format(folder, fmt: str, splits: dict[str, list[np.ndarray]]) -> None:
    """splits {split: [token arrays]} written as fmt would write them."""
    folder.mkdir(parents=True, exist_ok=True)
    index = 0
    for split in ("val", "train"):
        for tokens in splits[split]:
            if fmt == "build-nanogpt":  # fineweb.py: np.save(f"edufineweb_{split}_{shard_index:06d}", ...)
                np.save(folder / f"edufineweb_{split}_{index:06d}", tokens)
            elif fmt == "nanoGPT":  # prepare.py: np.memmap(f"{split}.bin", dtype=np.uint16, mode="w+")
                tokens.tofile(folder / f"{split}.bin")
            else:  # llm.c fineweb.py: f"{name}_{split}_{shard_index:06d}.bin"
                llmc_write(folder / f"fineweb_{split}_{index:06d}.bin", tokens)
            index += 1


@pytest.mark.parametrize("fmt, train_sizes", [("build-nanogpt", [700, 0, 900]), ("nanoGPT", [2000]),
                                              ("llm.c", [700, 0, 900])])
def test_every_shard_format_reads_as_its_token_stream(tmp_path, fmt, train_sizes):
    splits = {"val": [tokens_of(500, 0)], "train": [tokens_of(n, i + 1) for i, n in enumerate(train_sizes)]}
    write_format(tmp_path / "d", fmt, splits)
    (tmp_path / "d" / "README.md").write_text("other files are ignored")
    got = open_token_dir(tmp_path / "d")
    assert got.meta["format"] == fmt
    assert np.array_equal(np.asarray(got.train), np.concatenate(splits["train"]))
    assert np.array_equal(np.asarray(got.val), np.concatenate(splits["val"]))
    assert all(isinstance(p, np.memmap) or len(p) == 0 for p in got.train.parts + got.val.parts)  # mapped, not read
    assert len(got.train.parts) == len(splits["train"])


def test_prepared_directory_reads_by_its_manifest(tmp_path):
    from flax_gpt.prepare import Settings, prepare

    (tmp_path / "a.txt").write_text("Some text that becomes a few shards of tokens. " * 30)
    prepare([tmp_path / "a.txt"], tmp_path / "out", Settings(shard_tokens=50, val_tokens=60))
    got = open_token_dir(tmp_path / "out")
    assert got.meta["format"] == shards.PREPARE_FORMAT
    assert [len(p) for p in got.val.parts] == [50, 10] and len(got.train.parts) > 3
    (tmp_path / "out" / got.meta["shards"][-1]["file"]).unlink()
    with pytest.raises(UserError, match="is missing .listed in .*manifest.json.; copy the whole directory"):
        open_token_dir(tmp_path / "out")


def test_evaluate_measures_a_shard_directorys_val_split(tmp_path):
    from flax_gpt.evaluate import read_tokens, windows

    write_format(tmp_path / "d", "llm.c", {"val": [tokens_of(40, 0), tokens_of(25, 1)], "train": [tokens_of(90, 2)]})
    tokens = read_tokens(tmp_path / "d")
    assert np.array_equal(np.asarray(tokens), np.concatenate([tokens_of(40, 0), tokens_of(25, 1)]))
    assert windows(tokens, 16) == [(0, 16), (16, 16), (32, 16), (48, 16)]  # evaluate_loss reads these slices
    assert np.array_equal(tokens[32:49], np.asarray(tokens)[32:49])  # one across the two files


def test_token_stream_slices_cross_files():
    parts = [tokens_of(n, i) for i, n in enumerate([5, 0, 1, 17, 3])]
    whole, stream = np.concatenate(parts), TokenStream(parts)
    assert len(stream) == 26
    for start in range(27):
        for stop in range(start, 28):
            assert np.array_equal(stream[start:stop], whole[start:stop]), (start, stop)
    assert np.array_equal(stream[-4:], whole[-4:])
    assert stream.where(6) == "part 3, token 0"


def test_loader_over_files_gives_the_batches_of_the_joined_tokens():
    parts = [tokens_of(n, i) for i, n in enumerate([70, 33, 1, 120, 64])]  # window starts and ends fall inside files
    joined, stream = np.concatenate(parts), TokenStream(parts)
    a, b = DataLoader(joined, 3, 16, seed=4), DataLoader(stream, 3, 16, seed=4)
    for _ in range(12):  # 3 epochs of 4 batches
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert a.state_dict() == b.state_dict()
    assert all(np.array_equal(u[0], v[0]) for u, v in zip(eval_batches(joined, 2, 16, 5), eval_batches(stream, 2, 16, 5)))


def test_a_token_outside_gpt2s_vocabulary_is_named(tmp_path):
    bad = np.zeros(200, np.uint16)
    bad[150] = 60000  # e.g. another tokenizer's ids
    write_format(tmp_path / "d", "build-nanogpt", {"val": [tokens_of(100, 0)], "train": [tokens_of(100, 1), bad]})
    loader = DataLoader(open_token_dir(tmp_path / "d").train, 1, 299, seed=0)
    with pytest.raises(UserError, match=r"token id 60000 near edufineweb_train_000001.npy, token 0 is not a GPT-2 token"):
        loader.next_batch()


REFUSED = {  # name: (setup(folder), fragments of the one-line error)
    "unfinished_prepare": (lambda d: (d / shards.JOURNAL).write_text("{}"), ["unfinished prepare", "re-run the same"]),
    "train_without_val": (lambda d: np.save(d / "x_train_000001.npy", tokens_of(10, 0)),
                          ["build-nanogpt train files but no val file"]),
    "npy_of_int32": (lambda d: [np.save(d / f"x_{s}_000000.npy", np.arange(9, dtype=np.int32)) for s in ("val", "train")],
                     ["holds a int32 array of shape (9,), not 1-D uint16"]),
    "npy_cut_short": (lambda d: [np.save(d / f"x_{s}_000000.npy", tokens_of(99, 0)) for s in ("val", "train")]
                      and os.truncate(d / "x_train_000000.npy", 150), ["x_train_000000.npy is truncated"]),
    "nanogpt_char_level": (lambda d: [(d / n).write_bytes(b"\0\0") for n in ("train.bin", "val.bin", "meta.pkl")],
                           ["character-level", "meta.pkl", "input.txt"]),
    "nanogpt_odd_bytes": (lambda d: [(d / n).write_bytes(b"\0\0\0") for n in ("train.bin", "val.bin")],
                          ["odd byte count (3)"]),
    "llmc_llama3": (lambda d: [llmc_write(d / f"f_{s}_000000.bin", tokens_of(9, 0), magic=shards.LLMC_LLAMA3_MAGIC)
                               for s in ("val", "train")], ["llama-3 shard", "not GPT-2 tokens"]),
    "llmc_version": (lambda d: [llmc_write(d / f"f_{s}_000000.bin", tokens_of(9, 0), version=7) for s in ("val", "train")],
                     ["header version 7"]),
    "llmc_cut_short": (lambda d: [llmc_write(d / f"f_{s}_000000.bin", tokens_of(9, 0), count=10) for s in ("val", "train")],
                       ["header says 10 tokens, the file holds 9"]),
    "unknown_bin": (lambda d: [(d / f"f_{s}.bin").write_bytes(b"\0" * 4) for s in ("val", "train")],
                    ["has no llm.c header", "nanoGPT's train.bin / val.bin"]),
    "bad_manifest": (lambda d: (d / shards.MANIFEST).write_text(json.dumps({"format": "other"})),
                     ["is not a flax_gpt.prepare manifest"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unusable_token_directories_are_one_line_errors(tmp_path, case):
    setup, fragments = REFUSED[case]
    folder = tmp_path / "d"
    folder.mkdir()
    setup(folder)
    with pytest.raises(UserError) as err:
        open_token_dir(folder)
    message = str(err.value)
    assert "\n" not in message and str(folder) in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_data_dirs_are_shards_else_text_else_refused(tmp_path):
    write_format(tmp_path / "shards", "nanoGPT", {"val": [tokens_of(50, 0)], "train": [tokens_of(90, 1)]})
    (tmp_path / "shards" / "input.txt").write_text("nanoGPT keeps the text beside its .bin files")
    assert data.load("shards", tmp_path).meta["format"] == "nanoGPT"  # the tokens win over the text beside them
    (tmp_path / "texts" / "deep").mkdir(parents=True)
    (tmp_path / "texts" / "deep" / "a.txt").write_text("Text only: tokenized into the cache. " * 20)
    assert data.load("texts", tmp_path).meta["format"] == shards.PREPARE_FORMAT
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "notes.md").write_text("nothing to train on")
    with pytest.raises(UserError, match=r"neither holds no token shards \(prepare output .*llm.c.*\) and no text "
                                        r"\(\.txt, \.jsonl, \.jsonl\.gz or \.parquet files\)"):
        data.load("neither", tmp_path)
