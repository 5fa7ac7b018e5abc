"""Stores built once on disk and reused: keyed by their content, built by one process while the others wait.

A second run, a resumed run and every rank of a DDP or multi-node job on the same data open the same directory
instead of converting and tokenizing again. The directory's name is a hash of everything its content depends on,
so a change of data, tokenizer, prompt or length gives a new one. A build is written under a temporary name and
renamed (``lit_embed.files``), with ``manifest.json`` written last: every file's size and SHA-256. A store is opened
only once it matches its manifest; one cut short (a full disk, an interrupted copy, a power cut before the page cache
reached the disk), with files deleted (temp cleaners keep folders), or from before manifests, is built again with one
warning.
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

from lit_embed.distributed import is_launching_process
from lit_embed.errors import LitEmbedError
from lit_embed.files import write_directory_atomic

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/lit_embed/data"
MANIFEST = "manifest.json"


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


CACHE_LOCKS = ("file", "rank0")
RANK0_WAIT_S = 2 * 3600  # how long the other processes wait for rank 0's build under cache_lock=rank0


def built_once(
    cache_dir: str | os.PathLike | None, name: str, build: Callable[[Path], None], what: str, lock: str = "file"
) -> Path:
    """The directory ``cache_dir/name``, filled by ``build(directory)`` unless an earlier build left it there, whole.

    Processes that ask for the same name at once (the ranks of a job, two runs on one machine) build it once:
    ``lock="file"`` takes an OS lock, so one builds and the others wait and then open its result, on one machine or
    on shared storage whose locks hold across machines. ``lock="rank0"`` is for shared storage whose locks do not:
    the job's global rank 0 builds, and every other process waits until the store is there, whole. A store that
    does not match its manifest is built again, with one warning naming it. ``cache_dir=None`` builds into a
    temporary directory of this process, removed when it exits (nothing is shared or kept).
    """
    if cache_dir is None:
        path = Path(tempfile.mkdtemp(prefix=f"lit_embed-{name[:40]}-"))
        atexit.register(shutil.rmtree, path, True)
        _timed_build(build, path, what)
        return path
    root = Path(cache_dir).expanduser()
    path = root / name
    if path.is_dir() and damage(path) is None:
        return path
    if lock == "rank0" and not is_launching_process():  # a rank > 0 of the job
        return _built_by_rank_zero(path, what)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / f".{name}.lock", required=lock == "file"):
            # Checked again under the lock: another process may have (re)built it while this one waited, and
            # must not have its fresh store replaced (nor warned about) again.
            problem = damage(path) if path.exists() else None
            if problem is not None:
                log.warning("%s is not whole (%s): building %s again.", path, problem, what)
            if problem is not None or not path.exists():
                write_directory_atomic(path, lambda staging: _build_with_manifest(build, staging, what))
                log.info("Stored in %s; later runs on the same data reuse it.", path)
    except OSError as err:
        if err.errno in LOCKS_UNSUPPORTED and lock == "file":
            raise LitEmbedError(
                f"data.cache_dir={cache_dir}: the file system of {root} cannot lock files ({err.strerror}). Set "
                "data.cache_lock=rank0 (rank 0 builds each store, the other processes wait for it), or use a "
                "cache_dir on a disk that can."
            ) from None
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        if not full and not str(err.filename or "").startswith(str(root)):
            raise  # not the store's own files (reading the input reports its own errors)
        raise LitEmbedError(
            f"data.cache_dir={cache_dir}: cannot store {what} in {root} ({err.strerror}). Set data.cache_dir to a "
            "writable folder with space for the data, or data.cache_dir=null for a temporary one per process."
        ) from None
    return path


def _built_by_rank_zero(path: Path, what: str) -> Path:
    """Waits for rank 0 to finish ``path`` (``cache_lock=rank0``): it appears only whole, renamed into place."""
    started = time.monotonic()
    log.info("Waiting for rank 0 to build %s in %s (data.cache_lock=rank0).", what, path)
    while not (path.is_dir() and damage(path) is None):
        waited = time.monotonic() - started
        if waited > RANK0_WAIT_S:
            raise LitEmbedError(
                f"data.cache_lock=rank0: waited {waited / 60:.0f} min for rank 0 to build {what} in {path}, and it "
                "is not there. Every node must see the same data.cache_dir with cache_lock=rank0: for a disk of each "
                "node's own, use data.cache_lock=file. Otherwise see rank 0's log for why its build stopped."
            )
        time.sleep(1.0)
    return path


def damage(directory: Path) -> str | None:
    """What keeps a built store from being used, or None when every file its manifest lists is there, whole.

    Every file is hashed, on every open and by every rank: SHA-256 runs at about 1.7 GB/s where the CPU has SHA
    instructions (AMD since Zen, Intel since Ice Lake, arm64 servers) and 400-500 MB/s where it has not, so 0.6 to
    2.5 s per GB of store against the minutes a build takes, and the pages read are the ones training maps next.
    Sizes alone would miss a file overwritten in place. Files the manifest does not list are not looked at: nothing
    reads them.
    """
    if not directory.is_dir():
        return "not a folder"
    try:
        listed = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))["files"]
        files = [(str(name), int(entry["bytes"]), str(entry["sha256"])) for name, entry in listed.items()]
    except FileNotFoundError:
        return f"no {MANIFEST}: its files were deleted, or it was built by a lit_embed that wrote none"
    except OSError as err:
        return f"{MANIFEST} cannot be read ({err.strerror})"
    except (ValueError, TypeError, LookupError, AttributeError):  # not JSON, or not the manifest's shape
        return f"{MANIFEST} is not the manifest lit_embed writes"
    for name, size, sha256 in files:
        file = directory / name
        try:
            actual = file.stat().st_size
            if actual != size:
                return f"{name} is {actual:,} bytes, expected {size:,}"
            if file_digest(file) != sha256:
                return f"{name} does not match its SHA-256: it changed after the store was built"
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as err:
            return f"{name} cannot be read ({err.strerror})"
    return None


def _build_with_manifest(build: Callable[[Path], None], directory: Path, what: str) -> None:
    _timed_build(build, directory, what)
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    listed = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": file_digest(p)} for p in files}
    # Last, once every file it lists is complete: it describes the finished build, whatever happens to it later.
    (directory / MANIFEST).write_text(json.dumps({"files": listed}, indent=1), encoding="utf-8")


def _timed_build(build: Callable[[Path], None], directory: Path, what: str) -> None:
    log.info("Building %s (once)...", what)
    started = time.perf_counter()
    build(directory)
    log.info("Built %s in %.1f s.", what, time.perf_counter() - started)


# What flock raises on a file system that cannot lock (Lustre mounted without -o flock, some FUSE mounts).
LOCKS_UNSUPPORTED = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK)


@contextmanager
def _locked(path: Path, required: bool = True) -> Iterator[None]:
    """An exclusive OS lock on ``path``; where the file system has none and the lock is not ``required`` (rank 0
    alone builds), the block runs without it."""
    # flock dies with its process (kill -9 included), so a crashed build never blocks the next one.
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
            locked = True
        except OSError as err:
            if required or err.errno not in LOCKS_UNSUPPORTED:
                raise
            locked = False
        try:
            yield
        finally:
            if locked:
                fcntl.flock(f, fcntl.LOCK_UN)
