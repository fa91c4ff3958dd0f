"""Files and directories written whole: a reader, or a crash, sees the old version or the new one, never a cut one.

    atomic_write      one file: written to a temporary file beside it, synced, renamed over it
    atomic_directory  a set of files: written into a temporary directory beside the target, which becomes the
                      target at once (a rename) or, when the target exists, hands it each file by a rename

The temporary files are hidden, named after their target, and removed on any error: only a kill leaves one.
What is written in pieces over a long time has its own writer, atomic the same way: shards.NpyWriter (a shard
filled chunk by chunk into `<shard>.tmp`, renamed on close) and orbax's checkpoints (checkpoint.Checkpointer).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, data: bytes | str | Callable[[BinaryIO], None]) -> None:
    """Write path whole: data (a str is UTF-8), or what write(f) writes to the binary file f it is given.

    The bytes go to a temporary file in path's directory, are synced to disk and renamed over path.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | Path, names: Sequence[str]) -> Iterator[Path]:
    """with atomic_directory(path, names) as tmp: write the files `names` into tmp.

    When the block ends without an error each file is synced and the files appear at path: the whole directory
    at once (a rename) where path does not exist, else each file renamed over its namesake in path, in the order
    of names (each rename atomic; other files in path stay). On an error tmp is removed and path is untouched.
    """
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for name in names:
            _fsync(tmp / name)
        if path.exists():
            for name in names:
                os.replace(tmp / name, path / name)
            tmp.rmdir()
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
