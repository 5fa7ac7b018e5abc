"""Batches without repeated texts: with in-batch negatives a repeated text is a false negative."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class NoDuplicatesBatchSampler(Sampler[list[int]]):
    """Shuffles every epoch from ``seed + epoch`` and fills each batch with rows that share no text.

    A row that clashes with the batch being filled waits for the next one, so every row is used exactly once per
    epoch; only the last few batches can come out smaller when the clashing rows run out of partners.

    Args:
        row_texts: for each row, the ids of every text it holds (query, positive, negatives). Ids (not strings)
            keep the per-epoch work cheap.
        batch_size: rows per batch.
        seed: base seed; epoch ``e`` uses ``seed + e``, so a resumed run sees the same order.
        drop_last: drop a final batch smaller than ``batch_size``.
    """

    def __init__(self, row_texts: Sequence[Sequence[int]], batch_size: int, seed: int = 0, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.row_texts = [frozenset(texts) for texts in row_texts]
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self._batches: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """This epoch's batches (computed once per epoch; ``len`` and iteration agree)."""
        if self._batches is None or self._batches[0] != self.epoch:
            self._batches = (self.epoch, self._make_batches())
        return self._batches[1]

    def _make_batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.row_texts), generator=generator).tolist()
        batches = []
        pending: list[int] = []  # rows that clashed earlier; they get the first try at the next batch
        position = 0
        while position < len(order) or pending:
            batch: list[int] = []
            seen: set[int] = set()
            still_pending = []
            for row in pending:
                if len(batch) < self.batch_size and seen.isdisjoint(self.row_texts[row]):
                    batch.append(row)
                    seen.update(self.row_texts[row])
                else:
                    still_pending.append(row)
            while len(batch) < self.batch_size and position < len(order):
                row = order[position]
                position += 1
                if seen.isdisjoint(self.row_texts[row]):
                    batch.append(row)
                    seen.update(self.row_texts[row])
                else:
                    still_pending.append(row)
            batches.append(batch)
            pending = still_pending
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())
