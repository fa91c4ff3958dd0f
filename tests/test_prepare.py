"""`python -m flax_gpt.prepare`: every input format into build-nanogpt .npy shards, the val split, bad documents,
the output directory's rules, and, in real processes, the parallel path, resuming after SIGKILL and bad input."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flax_gpt import prepare as prepare_lib
from flax_gpt import sources
from flax_gpt.errors import UserError
from flax_gpt.prepare import BadDocument, Settings, carve_val, prepare
from flax_gpt.shards import JOURNAL, MANIFEST, NpyWriter, open_token_dir
from flax_gpt.tokenizer import EOT, get_encoding
from train_runs import PYTHON, REPO, Result, assert_refused, corpus_text, snapshot

# text a cut in the wrong place would tokenize differently: runs of spaces, tabs, CRLF, blank lines, indents,
# non-ASCII letters and spaces, digits, contractions, and <|endoftext|> as plain text
TRICKY = ("Title  \r\n\r\n  Indented line\n\tTabbed,   spaced   words \n\n\nI'll say 1984 things... \u00e9t\u00e9\n"
          "\u00a0non-breaking\u3000ideographic\n<|endoftext|> is text here\n  \n'quoted' end ")


def docs(n: int, seed: int) -> list[str]:
    """n documents of 1-4 lines of English-like text; some with the tricky text in them."""
    lines = corpus_text(4 * n, seed).splitlines()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        doc = "\n".join(lines[4 * i : 4 * i + int(rng.integers(1, 5))])
        out.append(doc + ("\n" + TRICKY if i % 7 == 3 else ""))
    return out


def expected_tokens(documents: list[str]) -> list[int]:
    enc = get_encoding()
    return [t for d in documents for t in [EOT] + enc.encode_ordinary(d)]


def write_jsonl(path: Path, documents: list[str], field: str = "text") -> Path:
    lines = "".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(documents))
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(lines.encode(), mtime=0))
    else:
        path.write_text(lines)
    return path


def write_parquet(path: Path, texts: list, column: str = "text", row_group_size: int = 7) -> Path:
    pq.write_table(pa.table({column: texts, "n": list(range(len(texts)))}), path, row_group_size=row_group_size)
    return path


def make_corpus(root: Path) -> tuple[list[Path], list[str]]:
    """A file of each format and a directory tree; returns (the SOURCE paths, every document in prepare's order)."""
    root.mkdir(parents=True, exist_ok=True)
    d = docs(60, 1)
    (root / "a.txt").write_bytes(b"\xef\xbb\xbf" + "\n".join(d[:8]).encode())  # a byte-order mark: not text
    (root / "tree" / "sub").mkdir(parents=True)
    (root / "tree" / "b.txt").write_text(d[8])
    (root / "tree" / "sub" / "c.txt").write_text(d[9] + TRICKY)
    (root / "tree" / "skipped.md").write_text("not a source format: ignored in a directory")
    write_jsonl(root / "d.jsonl", d[10:30])
    write_jsonl(root / "e.jsonl.gz", d[30:40])
    write_parquet(root / "f.parquet", d[40:60])
    paths = [root / "a.txt", root / "tree", root / "d.jsonl", root / "e.jsonl.gz", root / "f.parquet"]
    return paths, ["\n".join(d[:8]), d[8], d[9] + TRICKY, *d[10:60]]


def read_shards(out: Path) -> tuple[list[int], list[int]]:
    data = open_token_dir(out)
    return np.asarray(data.val).tolist(), np.asarray(data.train).tolist()


# ----------------------------------------------------------------------------- in process


def test_text_chunks_tokenize_as_the_whole_file(tmp_path):
    text = (TRICKY + "\n") * 20 + "A sentence without a newline for a while " * 30
    path = tmp_path / "t.txt"
    path.write_text(text)
    [source] = sources.find_sources([path])
    for chunk_bytes in (1, 5, 64, 1000, 1 << 20):
        chunks = list(sources.read_chunks([source], chunk_bytes, "text"))
        assert b"".join(c.data for c in chunks) == path.read_bytes()
        tokens = np.concatenate([prepare_lib.tokenize_chunk(c, "text", False).tokens for c in chunks])
        assert tokens.tolist() == expected_tokens([text]), chunk_bytes
        if chunk_bytes <= 64:
            assert len(chunks) > len(text) // 200  # really cut, at both kinds of places
    uncuttable = tmp_path / "u.txt"
    uncuttable.write_text("\u4e2d\u6587" * 300)  # no newline, no space: one piece whatever its size
    assert len(list(sources.read_chunks(sources.find_sources([uncuttable]), 16, "text"))) == 1


def test_every_input_format_gives_each_document_after_an_eot(tmp_path):
    paths, documents = make_corpus(tmp_path / "in")
    result = prepare(paths, tmp_path / "out", Settings(shard_tokens=97, val_tokens=150), chunk_bytes=200)
    val, train = read_shards(tmp_path / "out")
    assert val + train == expected_tokens(documents)
    assert len(val) == 150 and result.status == "prepared"
    m = result.manifest
    assert (m["format"], m["version"], m["tokenizer"], m["dtype"], m["eot"]) == ("flax-gpt token shards", 1, "gpt2",
                                                                                  "uint16", EOT)
    assert m["documents"] == len(documents) and m["tokens"] == len(val) + len(train) and m["skipped_documents"] == 0
    files = [s["path"] for s in m["sources"]]
    assert files == [str(tmp_path / "in" / n) for n in ("a.txt", "tree/b.txt", "tree/sub/c.txt", "d.jsonl",
                                                        "e.jsonl.gz", "f.parquet")]
    assert [s["format"] for s in m["sources"]] == ["text", "text", "text", "jsonl", "jsonl", "parquet"]
    assert [s["documents"] for s in m["sources"]] == [1, 1, 1, 20, 10, 20]
    for s in m["sources"]:
        raw = Path(s["path"]).read_bytes()
        assert (s["size"], s["sha256"]) == (len(raw), hashlib.sha256(raw).hexdigest())
    assert sum(s["tokens"] for s in m["sources"]) == m["tokens"]
    # build-nanogpt's layout: shard 0 is val, train from 1; every shard is what np.save writes for its tokens
    names = sorted(p.name for p in (tmp_path / "out").glob("*.npy"))
    assert names[-2:] == ["tokens_val_000000.npy", "tokens_val_000001.npy"] and names[0] == "tokens_train_000002.npy"
    for shard in m["shards"]:
        path = tmp_path / "out" / shard["file"]
        buf = io.BytesIO()
        np.save(buf, np.load(path))
        assert path.read_bytes() == buf.getvalue() and shard["tokens"] <= 97
    # build-nanogpt's DataLoaderLite lists a split's shards as `sorted(s for s in os.listdir(root) if split in s)`
    for split, want in (("val", val), ("train", train)):
        found = sorted(s for s in os.listdir(tmp_path / "out") if split in s)
        assert np.concatenate([np.load(tmp_path / "out" / f) for f in found]).tolist() == want


def test_val_fraction_is_the_last_tokens_whatever_shards_it_spans(tmp_path):
    paths, documents = make_corpus(tmp_path / "in")
    expected = expected_tokens(documents)
    prepare(paths, tmp_path / "out", Settings(shard_tokens=100, val_fraction=0.3))
    val, train = read_shards(tmp_path / "out")
    n_val = int(len(expected) * 0.3)
    assert (train, val) == (expected[:-n_val], expected[-n_val:])
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert len([s for s in manifest["shards"] if s["split"] == "val"]) >= 3  # a partial shard and whole ones


def carve_case(folder: Path, sizes: list[int]) -> list[dict]:
    """Train shards of the given sizes, as the stream leaves them before the val carve."""
    folder.mkdir()
    shard_list, start = [], 0
    for i, n in enumerate(sizes):
        writer = NpyWriter(folder / f"x_train_{i:06d}.npy")
        writer.write(np.arange(start, start + n, dtype=np.uint16))
        writer.close()
        shard_list.append({"file": f"x_train_{i:06d}.npy", "split": "train", "tokens": n})
        start += n
    return shard_list


def test_the_val_carve_finishes_whenever_it_was_stopped(tmp_path, monkeypatch):
    sizes, n_val = [40, 40, 40, 13], 70  # the cut falls inside the second shard
    done = carve_val(tmp_path / "ref", carve_case(tmp_path / "ref", sizes), n_val, "x")
    reference = snapshot(tmp_path / "ref")
    assert [(s["file"], s["tokens"]) for s in done] == [("x_train_000000.npy", 40), ("x_train_000001.npy", 23),
                                                       ("x_val_000001.npy", 17), ("x_val_000002.npy", 40),
                                                       ("x_val_000003.npy", 13)]
    assert np.load(tmp_path / "ref" / "x_val_000001.npy").tolist() == list(range(63, 80))
    real_replace = os.replace
    for stop_after in range(4):  # before each os.replace: the new val shard, the shortened train shard, 2 renames
        folder = tmp_path / f"stop{stop_after}"
        shard_list = carve_case(folder, sizes)
        calls = {"n": 0}

        def replace_then_stop(a, b):
            if calls["n"] == stop_after:
                raise KeyboardInterrupt  # as if killed here
            calls["n"] += 1
            real_replace(a, b)

        monkeypatch.setattr(os, "replace", replace_then_stop)
        with pytest.raises(KeyboardInterrupt):
            carve_val(folder, shard_list, n_val, "x")
        monkeypatch.setattr(os, "replace", real_replace)
        assert carve_val(folder, shard_list, n_val, "x") == done
        assert snapshot(folder) == reference, stop_after
    assert carve_val(tmp_path / "ref", carve_case(tmp_path / "again", sizes), n_val, "x") == done  # a no-op when done


BAD = {  # name: (file name, content writer, where the message points, the text of the good documents kept)
    "jsonl_not_json": ("b.jsonl", lambda p: p.write_text('{"text": "ok one"}\n{"text": "cut short\n{"text": "ok two"}\n'),
                       "b.jsonl:2: not valid JSON", ["ok one", "ok two"]),
    "jsonl_no_field": ("b.jsonl", lambda p: p.write_text('{"text": "ok one"}\n\n{"body": "x", "id": 3}\n'),
                       "b.jsonl:3: no 'text' field (fields: body, id)", ["ok one"]),
    "jsonl_not_string": ("b.jsonl", lambda p: p.write_text('{"text": 5}\n{"text": "ok two"}\n'),
                         "b.jsonl:1: 'text' is int, not a string", ["ok two"]),
    "jsonl_not_object": ("b.jsonl", lambda p: p.write_text('["a list"]\n{"text": "ok two"}\n'),
                         "b.jsonl:1: not a JSON object", ["ok two"]),
    "jsonl_not_utf8": ("b.jsonl", lambda p: p.write_bytes(b'{"text": "ok one"}\n{"text": "caf\xe9"}\n'),
                       "b.jsonl:2: not UTF-8 (byte 0xe9", ["ok one"]),
    "parquet_null": ("b.parquet", lambda p: write_parquet(p, ["ok one", None, "ok two"], row_group_size=2),
                     "b.parquet: row 1 (row group 0): 'text' is null", ["ok one", "ok two"]),
    "txt_not_utf8": ("b.txt", lambda p: p.write_bytes("caf\u00e9".encode("latin-1")),
                     "b.txt is not UTF-8 text: byte 0xe9 at offset 3", []),
    "txt_empty": ("b.txt", lambda p: p.write_bytes(b""), "b.txt is empty", []),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_document_stops_the_run_or_is_skipped_and_counted(tmp_path, case):
    name, write, where, kept = BAD[case]
    (tmp_path / "a.txt").write_text("A good first document.")
    write(tmp_path / name)
    paths = [tmp_path / "a.txt", tmp_path / name]
    settings = Settings(val_fraction=0.2)  # the val split is carved at the end: no shard is finished before
    with pytest.raises(BadDocument) as err:
        prepare(paths, tmp_path / "out", settings)
    assert where in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing finished: nothing is left
    result = prepare(paths, tmp_path / "out", settings, skip_bad=True)
    val, train = read_shards(tmp_path / "out")
    assert train + val == expected_tokens(["A good first document.", *kept])
    m = result.manifest
    assert m["skipped_documents"] == 1 and m["sources"][1]["skipped"] == 1 and where in m["skipped_examples"][0]
    assert m["documents"] == 1 + len(kept)


def test_a_bad_piece_of_a_large_text_file_is_left_out_with_skip_bad(tmp_path):
    good = "Line of text number one.\n" * 40
    (tmp_path / "big.txt").write_bytes(good.encode() + b"caf\xe9 broken\n" + good.encode())
    result = prepare([tmp_path / "big.txt"], tmp_path / "out", Settings(val_tokens=5), chunk_bytes=300, skip_bad=True)
    val, train = read_shards(tmp_path / "out")
    tokens = val + train
    assert tokens[0] == EOT and tokens.count(EOT) == 1  # still one document
    assert result.manifest["skipped_documents"] == 1 and "big.txt is not UTF-8 text: byte 0xe9 at offset 1003" in \
        result.manifest["skipped_examples"][0]
    chunks = list(sources.read_chunks(sources.find_sources([tmp_path / "big.txt"]), 300, "text"))
    kept = b"".join(c.data for c in chunks if not c.start <= 1003 < c.start + len(c.data))
    assert len(chunks) > 5 and len(kept) == len(good) * 2 + 12 - 312  # the 312-byte chunk holding it, not the file
    assert tokens == [EOT] + get_encoding().encode_ordinary(kept.decode())


def test_lone_surrogates_tokenize_as_encode_ordinary_does(tmp_path):
    write_jsonl(tmp_path / "s.jsonl", ["a \ud800 b", "ok"])  # json.dumps writes the escape "\ud800"
    prepare([tmp_path / "s.jsonl"], tmp_path / "out", Settings(val_tokens=1))
    val, train = read_shards(tmp_path / "out")
    enc = get_encoding()
    assert val + train == [EOT] + enc.encode_ordinary("a \ud800 b") + [EOT] + enc.encode_ordinary("ok")


def test_the_output_directory_is_never_someone_elses(tmp_path, monkeypatch):
    paths, _ = make_corpus(tmp_path / "in")
    settings = Settings(shard_tokens=100, val_tokens=100)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("the user's")
    with pytest.raises(UserError, match=r"taken holds files that prepare did not write \(mine.txt\)"):
        prepare(paths, tmp_path / "taken", settings)
    assert sorted(os.listdir(tmp_path / "taken")) == ["mine.txt"]

    out = tmp_path / "out"
    prepare(paths, out, settings)
    before = snapshot(out)
    stats = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    monkeypatch.setattr(prepare_lib, "tokenize_chunk", lambda *a, **k: pytest.fail("tokenized again"))
    assert prepare(paths, out, settings).status == "unchanged"
    os.utime(paths[0], ns=(10**18, 10**18))  # touched, same bytes: still unchanged; the manifest notes the time
    assert prepare(paths, out, settings).status == "unchanged"
    assert json.loads((out / MANIFEST).read_text())["sources"][0]["mtime_ns"] == 10**18
    assert {n: h for n, h in snapshot(out).items() if n != MANIFEST} == {n: h for n, h in before.items() if n != MANIFEST}
    assert all(p.stat().st_mtime_ns == stats[p.name] for p in out.iterdir() if p.name != MANIFEST)
    monkeypatch.undo()

    other = Settings(shard_tokens=50, val_tokens=100)
    with pytest.raises(UserError, match="holds shards prepared from other sources or settings; pass --overwrite"):
        prepare(paths, out, other)
    assert snapshot(out).keys() == before.keys()
    prepare(paths, out, other, overwrite=True)
    assert len(json.loads((out / MANIFEST).read_text())["shards"]) > len(before) - 1


def test_an_empty_split_is_refused_and_leaves_nothing(tmp_path):
    (tmp_path / "a.txt").write_text("Only a few tokens.")
    with pytest.raises(UserError, match=r"hold 6 tokens: 0 train and 6 val with --val-tokens 100.*change --val-tokens"):
        prepare([tmp_path / "a.txt"], tmp_path / "out", Settings(val_tokens=100))
    assert not (tmp_path / "out").exists()


def test_a_second_prepare_of_the_same_directory_is_refused(tmp_path):
    import fcntl

    (tmp_path / "a.txt").write_text("Some text. " * 20)
    (tmp_path / "out").mkdir()
    fd = os.open(tmp_path / "out", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another prepare is writing .*out; wait for it"):
            prepare([tmp_path / "a.txt"], tmp_path / "out", Settings(val_tokens=5))
    finally:
        os.close(fd)


def test_an_interrupted_run_resumes_after_its_finished_shards(tmp_path, monkeypatch):
    paths, _ = make_corpus(tmp_path / "in")
    settings = Settings(shard_tokens=60, val_tokens=100)
    prepare(paths, tmp_path / "ref", settings, chunk_bytes=150)
    close = prepare_lib.ShardSink._close

    def close_then_stop(self, *args, **kwargs):
        close(self, *args, **kwargs)
        if len(self.journal["shards"]) == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(prepare_lib.ShardSink, "_close", close_then_stop)
    with pytest.raises(KeyboardInterrupt):
        prepare(paths, tmp_path / "out", settings, chunk_bytes=150)
    assert len(json.loads((tmp_path / "out" / JOURNAL).read_text())["shards"]) == 4
    with pytest.raises(UserError, match="out is an unfinished prepare"):
        open_token_dir(tmp_path / "out")
    monkeypatch.undo()
    result = prepare(paths, tmp_path / "out", settings, chunk_bytes=150)
    assert (result.status, result.resumed_shards) == ("resumed", 4)
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "ref")


# ----------------------------------------------------------------------------- real processes

KILL_AFTER = r"""
import os, signal, sys
from flax_gpt import prepare, shard_writer
where, at, *argv = sys.argv[1:]
at = int(at)
if where == "shard":  # SIGKILL right after the at-th shard is committed
    close = prepare.ShardSink._close
    def close_then_die(self, *a, **k):
        close(self, *a, **k)
        if len(self.journal["shards"]) == at:
            os.kill(os.getpid(), signal.SIGKILL)
    prepare.ShardSink._close = close_then_die
else:  # SIGKILL in the val carve, after `at` token copies
    copy = shard_writer._copy_tokens
    calls = [0]
    def copy_then_die(*a):
        copy(*a)
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
    shard_writer._copy_tokens = copy_then_die
sys.exit(prepare.main(argv))
"""


def run_cli(args: list, cwd: Path, wrapper: list | None = None) -> Result:
    cmd = [PYTHON, *(wrapper or ["-m", "flax_gpt.prepare"]), *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    return Result("prepare", proc.returncode, proc.stdout, proc.stderr, 0.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare_cli")
    make_corpus(root / "in")
    return root


SOURCES = ["in/a.txt", "in/tree", "in/d.jsonl", "in/e.jsonl.gz", "in/f.parquet"]
SMALL = ["--shard-tokens", "80", "--val-tokens", "100", "--chunk-bytes", "150", "--no-progress"]


def test_help_names_the_form_and_the_flags(corpus):
    r = run_cli(["--help"], corpus)
    assert r.returncode == 0
    for text in ("SOURCE", "--out", "--shard-tokens", "--val-fraction", "--skip-bad", "--text-field", "build-nanogpt"):
        assert text in r.stdout, text


def test_tokenizer_processes_write_the_same_bytes(corpus):
    one = run_cli([*SOURCES, "--out", "one", *SMALL, "--workers", "1"], corpus)
    two = run_cli([*SOURCES, "--out", "two", *SMALL, "--workers", "2"], corpus)
    assert one.returncode == two.returncode == 0, (one.stderr, two.stderr)
    assert "one: done in" in one.stdout and "train with: python train.py --data one" in one.stdout
    assert snapshot(corpus / "one") == snapshot(corpus / "two")
    assert len(snapshot(corpus / "one")) > 10  # many shards


@pytest.mark.parametrize("where, at, extra", [("shard", 3, ["--val-tokens", "100"]),
                                              ("carve", 1, ["--val-fraction", "0.3"])])
def test_sigkill_then_the_same_command_resumes_to_the_same_bytes(corpus, where, at, extra):
    args = [*SOURCES, *SMALL[:2], *extra, *SMALL[4:]]
    ref = run_cli([*args, "--out", f"ref_{where}"], corpus)
    assert ref.returncode == 0, ref.stderr
    killed = run_cli([where, at, *args, "--out", f"k_{where}"], corpus, wrapper=["-c", KILL_AFTER])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    out = corpus / f"k_{where}"
    assert (out / JOURNAL).exists() and not (out / MANIFEST).exists()
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.npy")}
    resumed = run_cli([*args, "--out", f"k_{where}"], corpus)
    assert resumed.returncode == 0, resumed.stderr
    if where == "shard":
        assert "resumed after 3 finished shards" in resumed.stdout, resumed.stdout
        assert len(finished) == 3 and all((p.stat().st_ino, p.stat().st_mtime_ns) == finished[p.name]
                                          for p in out.glob("*.npy") if p.name in finished)  # not written again
    assert snapshot(out) == snapshot(corpus / f"ref_{where}")


def bad_case(tmp: Path, case: str) -> tuple[list, list[str]]:
    """(prepare arguments, fragments of the error line) of one bad input."""
    if case == "missing":
        return ["nope.txt"], ["nope.txt does not exist"]
    if case == "dangling_link":
        (tmp / "tree").mkdir()
        (tmp / "tree" / "ok.txt").write_text("fine")
        os.symlink(tmp / "gone.txt", tmp / "tree" / "z.txt")
        return ["tree"], ["cannot read", "z.txt", "No such file"]
    if case == "not_utf8":
        (tmp / "l.txt").write_bytes("caf\u00e9\n".encode("latin-1") * 9)
        return ["l.txt"], ["l.txt is not UTF-8 text: byte 0xe9 at offset 3", "--skip-bad"]
    if case == "jsonl_not_json":
        (tmp / "j.jsonl").write_text('{"text": "fine"}\n' * 50 + '{"text": oops}\n')
        return ["j.jsonl"], ["j.jsonl:51: not valid JSON (Expecting value at column 10)", "--skip-bad"]
    if case == "jsonl_no_field":
        write_jsonl(tmp / "j.jsonl", ["a", "b"], field="content")
        return ["j.jsonl"], ["j.jsonl:1: no 'text' field (fields: id, content)", "--text-field"]
    if case == "parquet_no_column":
        write_parquet(tmp / "p.parquet", ["a", "b"], column="body")
        return ["p.parquet"], ["p.parquet has no column 'text' (columns: body, n)", "--text-field"]
    if case == "damaged_gzip":
        (tmp / "g.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 999)[:60])
        return ["g.jsonl.gz"], ["g.jsonl.gz: damaged gzip data"]
    if case == "token_file":
        np.save(tmp / "t.npy", np.zeros(3, np.uint16))
        return ["t.npy"], ["t.npy is a token file, not a text source"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "dangling_link", "not_utf8", "jsonl_not_json", "jsonl_no_field",
                                  "parquet_no_column", "damaged_gzip", "token_file"])
def test_bad_input_is_one_line_exit_2_and_nothing_left_as_complete(tmp_path, case):
    args, fragments = bad_case(tmp_path, case)
    before = snapshot(tmp_path)
    r = run_cli([*args, "--out", "out", "--val-tokens", "1", "--no-progress"], tmp_path)
    assert_refused(r, *fragments)
    assert r.stdout == ""
    assert not (tmp_path / "out").exists()  # nothing finished: no trace
    assert snapshot(tmp_path) == before  # the inputs are as they were


def test_skip_bad_reports_what_it_left_out(tmp_path):
    (tmp_path / "j.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n{"body": 1}\n{"text": "also fine"}\n')
    r = run_cli(["j.jsonl", "--out", "out", "--val-tokens", "1", "--skip-bad", "--no-progress"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "2 documents from 1 files" in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: left out 2 bad documents") and "j.jsonl:2:" in lines[0]
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["skipped_documents"] == 2
