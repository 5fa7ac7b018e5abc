"""Writing files so that a crash, a kill or a full disk never leaves half of one where a whole one was, and only into
folders a command may write into.

Every file and directory lit_embed writes goes through one of these: a temporary sibling, then one rename.
``tempfile`` creates its files ``0600`` and directories ``0700`` whatever the umask; these end with the mode a plain
``open()`` or ``mkdir`` would give (``0666`` / ``0777`` less the umask), so a model is as readable as any other
file its owner writes.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from lit_embed.errors import LitEmbedError

LOCK_NAME = ".lock"


def _umask_by_setting() -> int:
    # The only portable way to read the umask is to set it, which is process-wide: a file another thread
    # creates meanwhile gets 0o077, more private rather than less. Done once, at import.
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _umask_from_proc() -> int | None:
    """The umask as Linux (4.7 and later) reports it, read without changing it; None where it does not."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return None


# Read at import on purpose, the one global effect of importing lit_embed: where /proc does not report the umask (not
# Linux) it is read by setting it, and at import no thread of a run exists yet to create a file with the 0o077.
_UMASK_AT_IMPORT = _umask_from_proc()
if _UMASK_AT_IMPORT is None:
    _UMASK_AT_IMPORT = _umask_by_setting()


def umask() -> int:
    """The process umask now where Linux reports it, else as it was when lit_embed was imported."""
    mask = _umask_from_proc()
    return _UMASK_AT_IMPORT if mask is None else mask


def plain_mode(directory: bool = False, executable: bool = False) -> int:
    """The mode ``mkdir`` (``directory``) or ``open()`` would give a new entry under the current umask."""
    return (0o777 if directory or executable else 0o666) & ~umask()


def _make_plain(root: Path) -> None:
    """Gives ``root`` and everything below it the modes a plain ``mkdir`` / ``open()`` would have.

    Writers inside a staged directory (safetensors, tempfile) create some files ``0600``; the directory is new
    and ours, so nothing in it was meant to be more private than the umask says.
    """
    os.chmod(root, plain_mode(directory=True))
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(parent, name)
            if os.path.islink(path):  # a link has no mode of its own; its target is not ours to change
                continue
            mode = os.stat(path).st_mode
            os.chmod(path, plain_mode(directory=stat.S_ISDIR(mode), executable=bool(mode & 0o111)))


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
            os.fchmod(f.fileno(), plain_mode())  # mkstemp's 0600 would hide the file from everyone else
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
    complete, and removed after the new one is in place. Everything in it gets the umask's modes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        write(staging)
        _make_plain(staging)
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


def check_folder_owner(folder: str | os.PathLike, marker: str, where: str, made_by: str) -> None:
    """Refuses ``folder`` unless it is new, empty, or holds ``marker`` (written by :class:`FolderLock` when ``made_by``
    took it): a command writes only into such a folder, so no file of the user's is ever replaced or mixed with its own.

    Args:
        folder: the folder the command is about to write into (a file there is its caller's message).
        marker: the file that marks a folder as the command's, e.g. ``.lit_embed_run``.
        where: the folder as the user named it, for the message (``output_dir=runs/x``, ``OUT_DIR qa``).
        made_by: who writes into it, for the message (``a lit_embed run``).
    """
    path = Path(folder).expanduser()
    if not path.is_dir() or (path / marker).is_file():
        return
    # The lock file is the command's even before its marker is written (another may be taking the folder now).
    entries = sorted(entry.name + "/" * entry.is_dir() for entry in path.iterdir() if entry.name != LOCK_NAME)
    if entries:
        shown = ", ".join(entries[:6]) + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")
        raise LitEmbedError(
            f"{where} already holds files that {made_by} did not make ({shown}). It writes only into a new or empty "
            f"folder, or one {made_by} made (it holds {marker}), so that nothing of yours is replaced. Choose another "
            f"folder, e.g. {path / 'run'}."
        )


class FolderLock:
    """An OS lock (``flock``) on ``folder/.lock``, held while a command writes there; the file holds its process id.
    Taking it marks the folder as the command's (``marker``); whoever takes it has checked the folder first
    (:func:`check_folder_owner`).

    The kernel drops the lock when the process ends in any way (``kill -9`` included), so a folder is never left
    locked by a dead process; a marker file would be. The file is removed on release: a process that opened it just
    before then sees, once it holds the lock, that the path names another file, and tries again.

    Args:
        folder: the folder.
        marker: the file that marks it as the command's, and what that file says.
        where: the folder as the user named it, for the message (``output_dir=runs/x``).
        holder: what holds it, for the message (``another run``).
    """

    def __init__(self, folder: str | os.PathLike, marker: tuple[str, str], where: str, holder: str) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.marker, self.where, self.holder = marker, where, holder
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
                os.close(fd)
                raise LitEmbedError(
                    f"{self.where} is in use by {self.holder} (process {holder}): two at once would write over each "
                    "other. Wait for it to end or stop it, or choose another folder."
                ) from None
            try:
                same_file = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)  # released and removed by its holder between our open and our lock
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        mark_folder(self.path.parent, *self.marker)
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked, so no other process holds a lock on it
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def mark_folder(folder: str | os.PathLike, marker: str, note: str) -> None:
    """Writes ``folder/marker`` (saying ``note``) unless it is there: the folder is the command's from now on."""
    path = Path(folder) / marker
    if not path.is_file():
        write_text_atomic(path, json.dumps({marker.lstrip("."): note}) + "\n")
