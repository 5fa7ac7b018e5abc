"""Batches without repeated texts: with in-batch negatives a repeated text is a false negative."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """An epoch's batches, drawn from ``seed + epoch``; an interrupted epoch continues after its done batches.

    Subclasses say what an epoch's batches are (:meth:`batches`); resuming and epoch bookkeeping live here.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.epoch = 0
        self._resume_at: tuple[int, int] | None = None

    @property
    def sampler(self) -> ResumableBatchSampler:
        # Lightning calls ``batch_sampler.sampler.set_epoch(epoch)`` at every epoch start.
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Continues ``epoch`` after its first ``batches_done`` batches (exact resume).

        The epoch is set here too: Lightning iterates a restarted epoch before its ``set_epoch`` call.
        """
        self.set_epoch(epoch)
        self._resume_at = (epoch, batches_done)

    def batches(self) -> list[list[int]]:
        """This epoch's batches of row indices."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[int]]:
        start = 0
        if self._resume_at is not None and self._resume_at[0] == self.epoch:
            start, self._resume_at = self._resume_at[1], None
        return iter(self.batches()[start:])

    def __len__(self) -> int:
        return len(self.batches())


class NoDuplicatesBatchSampler(ResumableBatchSampler):
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
        super().__init__(seed)
        self.row_texts = [frozenset(texts) for texts in row_texts]
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self._batches: tuple[int, list[list[int]]] | None = None

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
        order = torch.randperm(len(self.row_texts), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        order = order.tolist()
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


class TaskSchedule(ResumableBatchSampler):
    """Interleaves the tasks' batches, one task per step; indices are offset into one shared index space.

    Args:
        samplers: each task's batch sampler (its no-duplicates guarantee holds within every batch).
        offsets: each task's first index in the shared space.
        mode: ``round_robin`` (one batch of each task in turn, until the task with the fewest batches runs out),
            ``proportional`` (every batch of every task once, in an order drawn so each task is spread evenly
            in expectation) or ``sequential`` (task after task).
        seed: epoch ``e`` is drawn from ``seed + e``, identically on every rank.
    """

    def __init__(self, samplers: list[NoDuplicatesBatchSampler], offsets: list[int], mode: str, seed: int = 0):
        super().__init__(seed)
        self.samplers = samplers
        self.offsets = offsets
        self.mode = mode

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        for sampler in self.samplers:
            sampler.set_epoch(epoch)

    def order(self) -> list[int]:
        """The task of each step of this epoch."""
        counts = [len(sampler) for sampler in self.samplers]
        if self.mode == "round_robin":
            return list(range(len(counts))) * min(counts)
        tasks = [task for task, count in enumerate(counts) for _ in range(count)]
        if self.mode == "proportional":
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            return [tasks[i] for i in torch.randperm(len(tasks), generator=generator).tolist()]
        return tasks

    def batches(self) -> list[list[int]]:
        task_batches = [iter(sampler.batches()) for sampler in self.samplers]
        return [[self.offsets[task] + row for row in next(task_batches[task])] for task in self.order()]
