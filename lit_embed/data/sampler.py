"""Batches without repeated texts: with in-batch negatives a repeated text is a false negative."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class EpochShuffle(Sampler[int]):
    """A fresh permutation of ``range(size)`` every epoch, drawn from ``seed + epoch`` (so resumable)."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class NoDuplicatesBatchSampler(Sampler[list[int]]):
    """Shuffles every epoch from ``seed + epoch`` and fills each batch with rows that share no text.

    A row that clashes with the batch being filled waits for the next one, so every row is used exactly once per
    epoch; only the last few batches can come out smaller when the clashing rows run out of partners.

    Under DDP every rank builds the same global batches of ``batch_size x num_replicas`` rows, so the guarantee
    holds for the global batch (what ``loss.gather_across_devices`` scores), and yields its own slice of each.

    Args:
        row_texts: for each row, the ids of every text it holds (query, positive, negatives). Ids (not strings)
            keep the per-epoch work cheap.
        batch_size: rows per batch.
        seed: base seed; epoch ``e`` is shuffled from ``seed + e``, so a resumed run sees the same order.
        drop_last: drop a final batch smaller than ``batch_size``.
        num_replicas: DDP processes; each gets ``batch_size`` rows of every global batch.
        rank: this process's slice.
    """

    def __init__(
        self,
        row_texts: Sequence[Sequence[int]],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.row_texts = [frozenset(texts) for texts in row_texts]
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        # Lightning calls ``batch_sampler.sampler.set_epoch(epoch)`` at every epoch start, as for a BatchSampler.
        self.sampler = EpochShuffle(len(self.row_texts), seed)
        self._batches: tuple[int, list[list[int]]] | None = None
        self._resume_at: tuple[int, int] | None = None

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Continues ``epoch`` after its first ``batches_done`` batches (exact resume).

        The epoch is set here too: Lightning iterates a restarted epoch before its ``set_epoch`` call.
        """
        self.set_epoch(epoch)
        self._resume_at = (epoch, batches_done)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def batches(self) -> list[list[int]]:
        """This rank's batches of this epoch (computed once per epoch; ``len`` and iteration agree)."""
        if self._batches is None or self._batches[0] != self.epoch:
            self._batches = (self.epoch, [self._slice(batch) for batch in self.global_batches()])
        return self._batches[1]

    def _slice(self, batch: list[int]) -> list[int]:
        # Even slices of a short last batch; every rank must run the same number of steps.
        size = len(batch)
        return batch[self.rank * size // self.num_replicas : (self.rank + 1) * size // self.num_replicas]

    def global_batches(self) -> list[list[int]]:
        """This epoch's batches over all ranks, each of up to ``batch_size x num_replicas`` rows sharing no text."""
        batch_size = self.batch_size * self.num_replicas
        order = list(self.sampler)
        batches = []
        pending: list[int] = []  # rows that clashed earlier; they get the first try at the next batch
        position = 0
        while position < len(order) or pending:
            batch: list[int] = []
            seen: set[int] = set()
            still_pending = []
            for row in pending:
                if len(batch) < batch_size and seen.isdisjoint(self.row_texts[row]):
                    batch.append(row)
                    seen.update(self.row_texts[row])
                else:
                    still_pending.append(row)
            while len(batch) < batch_size and position < len(order):
                row = order[position]
                position += 1
                if seen.isdisjoint(self.row_texts[row]):
                    batch.append(row)
                    seen.update(self.row_texts[row])
                else:
                    still_pending.append(row)
            batches.append(batch)
            pending = still_pending
        if self.drop_last and batches and len(batches[-1]) < batch_size:
            batches.pop()
        # Every rank needs a row of every batch; only the tail of rows that clash with all others can fall short.
        return [batch for batch in batches if len(batch) >= self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        start = 0
        if self._resume_at is not None and self._resume_at[0] == self.epoch:
            start = self._resume_at[1]
            self._resume_at = None
        return iter(self.batches()[start:])

    def __len__(self) -> int:
        return len(self.batches())
