"""Every error type a user can act on, and the one way a command reports them."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class LitEmbedError(Exception):
    """Bad input or an unusable setting; the message names the file, line, id or key and says what to do.

    The command-line apps print it without a traceback and exit with ``exit_code``.
    """

    exit_code = 2


class DataFormatError(LitEmbedError, ValueError):
    """A data file is unusable; the message says where and how to fix it."""


class InvalidValueError(LitEmbedError, ValueError):
    """A setting has a value outside what it allows.

    Constructors name their own argument (``batch_size``) and the Hydra app puts the config path in front of it
    (``data.batch_size``), so the message names the key the user typed; a key with a dot is already in full.
    """

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(key, value, allowed)
        self.key, self.value, self.allowed = key, value, allowed

    def __str__(self) -> str:
        return f"{self.key}={self.value!r} is not allowed: {self.allowed}."


class NonFiniteLossError(LitEmbedError):
    """The loss became NaN or infinite."""


class FinishedRunError(LitEmbedError):
    """The output_dir already holds a finished model, and ``overwrite`` is off."""


class StoppedError(LitEmbedError):
    """The run was stopped by a signal after saving a checkpoint; the message says how to continue."""

    exit_code = 143  # 128 + SIGTERM, what a shell reports for a job killed by SIGTERM

    def __init__(self, message: str, signum: int = 15) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # 130 for Ctrl-C (SIGINT), as a shell reports it


def user_error_behind(err: BaseException) -> LitEmbedError | None:
    """The :class:`LitEmbedError` that ``err`` wraps (a framework re-raising a constructor's error), if any."""
    while err is not None and not isinstance(err, LitEmbedError):
        err = err.__cause__ or err.__context__
    return err


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raises :class:`InvalidValueError` for ``key=value`` unless ``ok``; ``allowed`` says what is."""
    if not ok:
        raise InvalidValueError(key, value, allowed)


def is_int(value: Any) -> bool:
    """A whole number (bools, which Python counts as ints, are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


@contextmanager
def reported(prog: str, log: logging.Logger | None = None) -> Iterator[None]:
    """Turns a :class:`LitEmbedError` inside the block into one message and its exit code, never a traceback.

    The message goes to ``log`` for a command that logs (the Hydra app's ``train.log`` keeps it too), else to
    stderr as ``prog: error: message``.
    """
    try:
        yield
    except LitEmbedError as err:
        if log is not None:
            log.error("%s", err)
        else:
            print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
