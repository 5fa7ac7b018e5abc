"""Writing files so that a crash, a kill or a full disk never leaves half of one where a whole one was.

Every file and directory lit_embed writes goes through one of these: a temporary sibling, then one rename.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def open_atomic(path: str | os.PathLike, binary: bool = False) -> Iterator[IO[Any]]:
    """Opens a temporary sibling of ``path`` for writing; on success it is synced and renamed onto ``path``.

    On any error the temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes a UTF-8 text file through :func:`open_atomic`."""
    with open_atomic(path) as f:
        f.write(text)


def link_atomic(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Points ``target`` at ``source``'s bytes in one rename (a hard link, or a copy where links fail)."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_directory_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Calls ``write(staging)`` on a fresh sibling directory, then swaps it in for ``path``.

    A crash mid-write leaves ``path`` as it was: the old directory is only moved aside once the new one is
    complete, and removed after the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        write(staging)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            staging.rename(path)
            shutil.rmtree(old)
        else:
            staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
