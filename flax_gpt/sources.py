"""A corpus read in pieces: the files that SOURCE paths name, each read as chunks of about chunk_bytes that
tokenize independently, and the documents of a chunk.

    find_sources  SOURCE paths -> Source files (directories read recursively), each with its format
    read_chunks   a Source -> its Chunks in file order: raw bytes of whole lines, or texts of Parquet rows
    documents     a Chunk -> its documents' texts and its bad documents (runs in the tokenizer processes)

Formats: text (.txt, and any other file named on its own: the file is one document), JSON Lines (.jsonl,
.jsonl.gz: one document per line, in its text field) and Parquet (.parquet: one document per row of the
text column). A text file is cut only where GPT-2's pre-tokenizer always starts a new piece (before a
newline followed by a printable ASCII character, else before a space followed by an ASCII letter), so its
chunks tokenize to exactly the tokens of the whole file.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

from flax_gpt.errors import UserError

SUFFIXES = {".txt": "text", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "parquet"}
SOURCE_KINDS = ".txt, .jsonl, .jsonl.gz or .parquet"
_NOT_TEXT = {".npy": "a token file", ".bin": "a token file", ".json": "JSON (JSON Lines must be named .jsonl)",
             ".gz": "compressed (only .jsonl.gz is read)", ".zst": "compressed", ".bz2": "compressed",
             ".xz": "compressed", ".zip": "an archive", ".arrow": "Arrow (convert it to .parquet or .jsonl)"}
PARQUET_BATCH_ROWS = 256  # rows read from Parquet at a time; chunks gather batches up to chunk_bytes
_PRINTABLE = frozenset(range(0x21, 0x7F))  # ASCII without space and controls: never whitespace to the pre-tokenizer
_LETTERS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


@dataclasses.dataclass(frozen=True)
class Source:
    path: Path
    format: str  # text | jsonl | parquet
    size: int  # bytes on disk
    mtime_ns: int


@dataclasses.dataclass
class Chunk:
    """One unit of tokenizer work: whole lines of a text / JSON Lines file, or a batch of Parquet rows."""

    index: int  # position among all chunks of all sources
    source: int  # index of its Source
    path: str
    kind: str  # text | jsonl | rows
    data: bytes | list  # raw bytes (text, jsonl) or the rows' texts, None for a null value (rows)
    start: int  # text: byte offset in the file; jsonl: number of its first line; rows: its first row in the file
    first: bool = False  # text: the chunk that starts the file's document
    last: bool = False  # text: the chunk that ends it
    group: int = 0  # rows: the Parquet row group
    progress: int = 0  # bytes of the file it accounts for (the progress bar)


def find_sources(paths: list[Path]) -> list[Source]:
    """The files to read, in order: each path as given, a directory's files of a known format by relative path."""
    found = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            files = _tree_files(path)
            if not files:
                raise UserError(f"{path} holds no {SOURCE_KINDS} files (directories are read recursively)")
            found += [(f, SUFFIXES[_suffix(f)]) for f in files]
        elif path.exists() or path.is_symlink():
            found.append((path, _file_format(path)))
        else:
            raise UserError(f"{path} does not exist")
    return [_stat(path, fmt) for path, fmt in found]


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".jsonl.gz" if name.endswith(".jsonl.gz") else Path(name).suffix


def _tree_files(root: Path) -> list[Path]:
    """Files (and dangling links: they fail later, by name) under root with a known suffix, not hidden, by path."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in filenames if not f.startswith(".") and _suffix(Path(f)) in SUFFIXES]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def _file_format(path: Path) -> str:
    suffix = _suffix(path)
    if suffix in SUFFIXES:
        return SUFFIXES[suffix]
    if suffix in _NOT_TEXT:
        raise UserError(f"{path} is {_NOT_TEXT[suffix]}, not a text source; sources are {SOURCE_KINDS} files "
                        "(token directories go to train.py --data as they are)")
    return "text"  # named on its own: read as text whatever its name


def _stat(path: Path, fmt: str) -> Source:
    """A Source, after checking the file can be opened."""
    try:
        with open(path, "rb"):
            pass
        st = path.stat()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if not path.is_file():
        raise UserError(f"{path} is not a regular file")
    return Source(path, fmt, st.st_size, st.st_mtime_ns)


# ----------------------------------------------------------------------------- chunks (the reading process)


def read_chunks(sources: list[Source], chunk_bytes: int, text_field: str) -> Iterator[Chunk]:
    """Every chunk of every source, in order, numbered."""
    index = 0
    for i, source in enumerate(sources):
        reader = {"text": _text_chunks, "jsonl": _jsonl_chunks, "parquet": _parquet_chunks}[source.format]
        for chunk in reader(source, chunk_bytes, text_field):
            chunk.index, chunk.source, chunk.path = index, i, str(source.path)
            index += 1
            yield chunk


def _text_chunks(source: Source, chunk_bytes: int, text_field: str) -> Iterator[Chunk]:
    if source.size == 0:
        yield Chunk(0, 0, "", "text", b"", 0, first=True, last=True)  # documents() reports it
        return
    for offset, data, progress, last in _pieces(source.path, chunk_bytes, _text_cut):
        yield Chunk(0, 0, "", "text", data, offset, first=offset == 0, last=last, progress=progress)


def _jsonl_chunks(source: Source, chunk_bytes: int, text_field: str) -> Iterator[Chunk]:
    line = 1
    for _, data, progress, _ in _pieces(source.path, chunk_bytes, _line_cut):
        yield Chunk(0, 0, "", "jsonl", data, line, progress=progress)
        line += data.count(b"\n")


def _pieces(path: Path, chunk_bytes: int, find_cut) -> Iterator[tuple[int, bytes, int, bool]]:
    """(offset, bytes, bytes of the file read meanwhile, is the last) of consecutive pieces of a file (.gz:
    decompressed), each about chunk_bytes and ending where find_cut allows (longer if it allows nowhere sooner)."""
    with open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if path.name.lower().endswith(".gz") else raw
        buf, offset, reported = b"", 0, 0
        while True:
            try:
                block = stream.read(chunk_bytes)
            except (OSError, EOFError, zlib.error) as e:
                raise UserError(f"{path}: damaged gzip data after {offset + len(buf)} bytes ({e}); download or "
                                "compress it again") from None
            buf += block
            while buf and (not block or len(buf) >= chunk_bytes):
                cut = find_cut(buf) if block else len(buf)
                if cut is None:
                    break  # no place to cut yet: read more
                position = raw.tell()
                yield offset, buf[:cut], position - reported, not block
                offset, buf, reported = offset + cut, buf[cut:], position
            if not block:
                return


def _text_cut(buf: bytes) -> int | None:
    """The last index of buf where a text may be cut without changing its GPT-2 tokens, or None."""
    for sep, next_ok in ((b"\n", _PRINTABLE), (b" ", _LETTERS)):
        end = len(buf) - 1
        while (i := buf.rfind(sep, 1, end)) > 0:
            if buf[i + 1] in next_ok:
                return i
            end = i
    return None


def _line_cut(buf: bytes) -> int | None:
    """After the last newline of buf, or None."""
    i = buf.rfind(b"\n")
    return i + 1 if i >= 0 else None


def _parquet_chunks(source: Source, chunk_bytes: int, text_field: str) -> Iterator[Chunk]:
    pa, pq = _pyarrow()
    path = source.path
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} is not a readable Parquet file ({e})") from None
    schema = pf.schema_arrow
    if text_field not in schema.names:
        raise UserError(f"{path} has no column {text_field!r} (columns: {', '.join(schema.names)}); "
                        "name the text column with --text-field")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"{path}: column {text_field!r} holds {kind}, not strings; name the text column with --text-field")
    bytes_per_row = source.size / max(1, pf.metadata.num_rows)  # progress: the file's bytes spread over its rows

    def rows(texts: list, first: int, group: int) -> Chunk:
        progress = round((first + len(texts)) * bytes_per_row) - round(first * bytes_per_row)
        return Chunk(0, 0, "", "rows", texts, first, group=group, progress=progress)

    row = 0  # rows of the file before the next chunk
    for group in range(pf.num_row_groups):
        texts, size = [], 0
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group], columns=[text_field]):
                column = batch.column(0)
                texts += column.to_pylist()
                size += column.nbytes
                if size >= chunk_bytes:
                    yield rows(texts, row, group)
                    row, texts, size = row + len(texts), [], 0
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: row group {group} is unreadable ({e})") from None
        if texts:
            yield rows(texts, row, group)
            row += len(texts)


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading .parquet needs pyarrow: pip install 'flax-gpt[data]' (or pip install pyarrow)") from None
    return pa, pq


# ----------------------------------------------------------------------------- documents (the tokenizer processes)


def documents(chunk: Chunk, text_field: str) -> tuple[list[tuple[str, bool]], list[str]]:
    """([(text, starts a document)], [one line per bad document]) of a chunk."""
    if chunk.kind == "text":
        return _text_documents(chunk)
    if chunk.kind == "jsonl":
        return _jsonl_documents(chunk, text_field)
    docs, bad = [], []
    for i, text in enumerate(chunk.data):
        if text is None:
            bad.append(f"{chunk.path}: row {chunk.start + i} (row group {chunk.group}): {text_field!r} is null")
        else:
            docs.append((text, True))
    return docs, bad


def _text_documents(chunk: Chunk) -> tuple[list[tuple[str, bool]], list[str]]:
    """A piece of a text file; a bad piece keeps only the start of its document if later pieces continue it."""
    raw, path = chunk.data, chunk.path
    kept = [("", True)] if chunk.first and not chunk.last else []
    nul = raw.find(b"\0")
    if nul >= 0:
        why = f"{path} is not UTF-8 text: NUL byte at offset {chunk.start + nul} (binary or UTF-16?); convert it to UTF-8"
        return kept, [why]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        why = (f"{path} is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {chunk.start + e.start}; "
               "convert it to UTF-8")
        return kept, [why]
    if chunk.first:
        text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not text
        if not text:
            return [], [f"{path} is empty; add text to it or remove it"]
    return [(text, chunk.first)], []


def _jsonl_documents(chunk: Chunk, text_field: str) -> tuple[list[tuple[str, bool]], list[str]]:
    docs, bad = [], []
    for lineno, line in enumerate(chunk.data.split(b"\n"), chunk.start):
        if not line.strip():
            continue
        where = f"{chunk.path}:{lineno}"
        try:
            record = json.loads(line)
        except UnicodeDecodeError as e:
            bad.append(f"{where}: not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})")
            continue
        except json.JSONDecodeError as e:
            bad.append(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(record, dict):
            bad.append(f"{where}: not a JSON object")
        elif text_field not in record:
            keys = ", ".join(list(record)[:8])
            bad.append(f"{where}: no {text_field!r} field (fields: {keys}); name the text field with --text-field")
        elif not isinstance(record[text_field], str):
            bad.append(f"{where}: {text_field!r} is {type(record[text_field]).__name__}, not a string")
        else:
            docs.append((record[text_field], True))
    return docs, bad
