"""Ragged arrays: many variable-length rows as one flat numpy array plus offsets, saved as ``.npy`` and memory-mapped.

Token ids, texts (UTF-8 bytes), each row's hard negatives: millions of small rows cost two arrays, not millions of
Python objects, and a store on disk is read back with ``np.load(mmap_mode="r")`` without reading it whole.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np


@dataclass(frozen=True)
class Ragged:
    """Row ``i`` is ``values[offsets[i]:offsets[i + 1]]``.

    Attributes:
        values: ``[total]`` every row's values, one row after the other.
        offsets: ``[rows + 1]`` int64, from 0 to ``total``.
    """

    values: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence], dtype: np.dtype | type = np.int64) -> Ragged:
        lengths, values = array("q", [0]), []
        for row in rows:
            lengths.append(len(row))
            values.extend(row)
        return cls(np.asarray(values, dtype=dtype), np.cumsum(lengths, dtype=np.int64))

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> Ragged:
        """Texts as UTF-8 bytes (see :meth:`text`)."""
        encoded = [text.encode() for text in texts]
        offsets = np.cumsum([0, *map(len, encoded)], dtype=np.int64)
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def text(self, i: int) -> str:
        return self.row(i).tobytes().decode()

    def texts(self, indices: Iterable[int]) -> list[str]:
        return [self.text(int(i)) for i in indices]

    def take(self, indices: np.ndarray | Sequence[int]) -> Ragged:
        """The chosen rows, in that order, as a new (in-memory) ragged array; vectorised."""
        indices = np.asarray(indices, dtype=np.int64)
        starts, lengths = self.offsets[indices], self.offsets[indices + 1] - self.offsets[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Position k of the result reads values[starts[row of k] + (k - offsets[row of k])].
        flat = np.arange(offsets[-1], dtype=np.int64) + np.repeat(starts - offsets[:-1], lengths)
        return Ragged(self.values[flat], offsets)

    def head(self, n: int) -> Ragged:
        """Every row cut to its first ``n`` values."""
        lengths = np.minimum(self.lengths, n)
        offsets = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.arange(offsets[-1], dtype=np.int64) + np.repeat(self.offsets[:-1] - offsets[:-1], lengths)
        return Ragged(self.values[flat], offsets)

    def save(self, directory: Path, name: str) -> None:
        np.save(directory / f"{name}.values.npy", np.ascontiguousarray(self.values))
        np.save(directory / f"{name}.offsets.npy", self.offsets)

    @classmethod
    def load(cls, directory: Path, name: str) -> Ragged:
        """Memory-mapped: the rows are read from disk when used, and shared by every process that maps them."""
        return _mapped(directory / f"{name}.values.npy", directory / f"{name}.offsets.npy")

    def __reduce__(self) -> tuple:
        # A mapped array travels to DataLoader workers (spawn, forkserver) as its file names, not as its bytes.
        if isinstance(self.values, np.memmap) and isinstance(self.offsets, np.memmap):
            return _mapped, (self.values.filename, self.offsets.filename)
        return Ragged, (np.asarray(self.values), np.asarray(self.offsets))


def _mapped(values: str | os.PathLike, offsets: str | os.PathLike) -> Ragged:
    return Ragged(np.load(values, mmap_mode="r"), np.load(offsets, mmap_mode="r"))


class RaggedWriter:
    """Appends rows to a ragged array on disk, one at a time or in blocks, never holding the values in memory.

    The values go to a raw file as they come; :meth:`close` turns it into the ``.npy`` pair :meth:`Ragged.load`
    reads (the header is written in front of the values with numpy's own format functions).
    """

    def __init__(self, directory: Path, name: str, dtype: np.dtype | type) -> None:
        self.directory, self.name, self.dtype = directory, name, np.dtype(dtype)
        self._raw = directory / f"{name}.values.raw"
        self._file: BinaryIO = open(self._raw, "wb")  # noqa: SIM115 (closed in close())
        self._offsets = array("q", [0])

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def append(self, values: bytes | np.ndarray | Sequence) -> None:
        data = values if isinstance(values, bytes) else np.asarray(values, dtype=self.dtype).tobytes()
        self._file.write(data)
        self._offsets.append(self._offsets[-1] + len(data) // self.dtype.itemsize)

    def extend(self, block: Ragged) -> None:
        """Appends every row of ``block``."""
        self._file.write(np.ascontiguousarray(block.values, dtype=self.dtype).tobytes())
        end = self._offsets[-1]
        self._offsets.extend((block.offsets[1:] + end).tolist())

    def close(self) -> Ragged:
        self._file.close()
        total = self._offsets[-1]
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (total,)}
        target = self.directory / f"{self.name}.values.npy"
        with open(target, "wb") as out, open(self._raw, "rb") as raw:
            np.lib.format.write_array_header_1_0(out, header)
            while chunk := raw.read(1 << 20):
                out.write(chunk)
        os.unlink(self._raw)
        np.save(self.directory / f"{self.name}.offsets.npy", np.frombuffer(self._offsets, dtype=np.int64))
        return Ragged.load(self.directory, self.name)
