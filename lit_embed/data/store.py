"""Stores built once on disk and reused: keyed by their content, built by one process while the others wait.

A second run, a resumed run and every rank of a DDP or multi-node job on the same data open the same directory
instead of converting and tokenizing again. The directory's name is a hash of everything its content depends on,
so a change of data, tokenizer, prompt or length gives a new one, and an existing one is always complete: it is
written under a temporary name and renamed (``lit_embed.files``).
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lit_embed.errors import LitEmbedError
from lit_embed.files import write_directory_atomic

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/lit_embed/data"


def content_key(*parts: Any) -> str:
    """A short hex digest of JSON-serialisable parts: the name of what they determine."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, or of every file under a directory with its relative path."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else "").encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def built_once(cache_dir: str | os.PathLike | None, name: str, build: Callable[[Path], None], what: str) -> Path:
    """The directory ``cache_dir/name``, filled by ``build(directory)`` unless an earlier build left it there.

    Processes that ask for the same name at once (the ranks of a DDP job, two runs on one machine) take an OS lock:
    one builds, the others wait and then open its result. ``cache_dir=None`` builds into a temporary directory of
    this process, removed when it exits (nothing is shared or kept).
    """
    if cache_dir is None:
        path = Path(tempfile.mkdtemp(prefix=f"lit_embed-{name[:40]}-"))
        atexit.register(shutil.rmtree, path, True)
        _timed_build(build, path, what)
        return path
    root = Path(cache_dir).expanduser()
    path = root / name
    if path.is_dir():
        return path
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / f".{name}.lock"):
            if not path.is_dir():  # another process may have built it while this one waited
                write_directory_atomic(path, lambda staging: _timed_build(build, staging, what))
                log.info("Stored in %s; later runs on the same data reuse it.", path)
    except OSError as err:
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        if not full and not str(err.filename or "").startswith(str(root)):
            raise  # not the store's own files (reading the input reports its own errors)
        raise LitEmbedError(
            f"data.cache_dir={cache_dir}: cannot store {what} in {root} ({err.strerror}). Set data.cache_dir to a "
            "writable folder with space for the data, or data.cache_dir=null for a temporary one per process."
        ) from None
    return path


def _timed_build(build: Callable[[Path], None], directory: Path, what: str) -> None:
    log.info("Building %s (once)...", what)
    started = time.perf_counter()
    build(directory)
    log.info("Built %s in %.1f s.", what, time.perf_counter() - started)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    # flock dies with its process (kill -9 included), so a crashed build never blocks the next one.
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
