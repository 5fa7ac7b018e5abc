"""Batches without repeated texts: with in-batch negatives a repeated text is a false negative."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from lit_embed.data.ragged import Ragged

log = logging.getLogger(__name__)

# Deferred rows tried per batch (at least 4 batches' worth): bounds the work per batch when one text is shared by
# a large part of the data, while rows that clash now and then still get the first try at the next batch.
LOOKAHEAD = 256
# Recent full batches a deferred row at the end of an epoch may be swapped into.
SWAP_WINDOW = 64
# Rounds in a row that place no waiting row into a hole before the rest is filled one row at a time.
STALLED_ROUNDS = 3


def budget_runs(tokens: np.ndarray, capacity: int) -> list[int]:
    """Where each run of rows ends when each takes rows, in order, while their ``tokens`` fit ``capacity`` (a row
    over it is a run of its own)."""
    ends = np.cumsum(tokens)
    found = [0]
    while found[-1] < len(tokens):
        before = ends[found[-1] - 1] if found[-1] else 0
        found.append(max(found[-1] + 1, int(np.searchsorted(ends, before + capacity, side="right"))))
    return found[1:]


def even_runs(tokens: np.ndarray, count: int) -> list[int]:
    """Where each of ``count`` non-empty runs of rows (``count <= len(tokens)``) ends, in order, so that the run
    holding the most ``tokens`` holds as few as it can."""
    low, high = int(tokens.max()), int(tokens.sum())  # the least capacity that needs at most ``count`` runs
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if len(budget_runs(tokens, middle)) <= count else (middle + 1, high)
    ends = budget_runs(tokens, low)
    while len(ends) < count:  # fewer runs than asked: split off the last row of the fullest run of several rows
        starts = [0, *ends[:-1]]
        sums = [tokens[a:b].sum() if b - a > 1 else -1 for a, b in zip(starts, ends, strict=True)]
        fullest = int(np.argmax(sums))
        ends.insert(fullest, ends[fullest] - 1)
    return ends


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

    A row that clashes with its batch moves to another one, so every row is used exactly once per epoch; only the
    last few batches can come out smaller when the clashing rows run out of partners.

    Under DDP every rank builds the same global batches of ``batch_size x num_replicas`` rows, so the guarantee
    holds for the global batch (what ``loss.gather_across_devices`` scores), and yields its own slice of each.

    With a token budget (``max_tokens``), a batch whose slice holds more than ``max_tokens`` tokens on some rank is
    cut into the fewest steps that fit on every rank, each rank's slice into as many runs of rows, as even as that
    allows (a step shares no text either): a batch of long texts holds fewer pairs than one of short texts.

    Args:
        row_texts: for each row, the ids of every text it holds (query, positive, negatives), as a ragged array
            (or a list of id lists). Ids (not strings) keep the per-epoch work cheap.
        batch_size: rows per batch.
        seed: base seed; epoch ``e`` is shuffled from ``seed + e``, so a resumed run sees the same order.
        drop_last: drop a final batch smaller than ``batch_size``.
        num_replicas: DDP processes; each gets ``batch_size`` rows of every global batch.
        rank: this process's slice.
        row_tokens: each row's token count (all its texts), for ``max_tokens``.
        max_tokens: the most tokens a rank's batch holds; None: batches of ``batch_size`` rows.
    """

    def __init__(
        self,
        row_texts: Ragged | Sequence[Sequence[int]],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        row_tokens: np.ndarray | None = None,
        max_tokens: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        super().__init__(seed)
        self.row_texts = row_texts if isinstance(row_texts, Ragged) else Ragged.from_rows(row_texts)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        if max_tokens is not None and row_tokens is None:
            raise ValueError("max_tokens needs row_tokens")
        self.row_tokens = row_tokens
        self.max_tokens = max_tokens
        self._steps: tuple[int, list[list[list[int]]]] | None = None

    def batches(self) -> list[list[int]]:
        """This rank's batches of this epoch (computed once per epoch; ``len`` and iteration agree)."""
        return [step[self.rank] for step in self.steps()]

    def global_batches(self) -> list[list[int]]:
        """This epoch's batches over all ranks: every rank's rows of each step, in rank order."""
        return [[row for part in step for row in part] for step in self.steps()]

    def steps(self) -> list[list[list[int]]]:
        """This epoch's steps, each every rank's rows (rank ``r``'s at ``[r]``), the same on every rank."""
        if self._steps is None or self._steps[0] != self.epoch:
            self._steps = (self.epoch, self._build_steps())
        return self._steps[1]

    def _build_steps(self) -> list[list[list[int]]]:
        batches, moved = self._filled_batches()
        steps = [part for batch in batches for part in self._within_budget(self._even_slices(batch))]
        if self.max_tokens is not None and self.rank == 0 and steps:
            sizes = [sum(map(len, step)) for step in steps]
            log.info(
                "Epoch %d: %d steps of at most %d tokens per process, %.1f pairs on average (%d to %d).",
                *(self.epoch, len(steps), self.max_tokens, sum(sizes) / len(sizes), min(sizes), max(sizes)),
            )
        # Every rank needs a row of every step; only the tail of rows that clash with all others can fall short.
        kept = [step for step in steps if all(step)]
        left_out = sum(len(batch) for batch in batches) - sum(len(part) for step in kept for part in step)
        if (moved or left_out) and self.rank == 0:
            size = self.batch_size * self.num_replicas
            short = sum(len(batch) < size for batch in batches[:-1])
            log.info(
                "Epoch %d: %d of %d rows shared a text with the batch being filled and went into a later one; "
                "%d batches before the last are short (their rows share texts with every other row left)%s.",
                self.epoch,
                len(moved),
                len(self.row_texts),
                short,
                f"; {left_out} rows left out (a step with fewer rows than processes)" if left_out else "",
            )
        return kept

    def _even_slices(self, batch: list[int]) -> list[list[int]]:
        # Even slices of a short last batch; every rank must run the same number of steps.
        size, ranks = len(batch), self.num_replicas
        return [batch[rank * size // ranks : (rank + 1) * size // ranks] for rank in range(ranks)]

    def _filled_batches(self) -> tuple[list[list[int]], set[int]]:
        """This epoch's batches over all ranks, each of up to ``batch_size x num_replicas`` rows sharing no text, and
        the rows that moved to a later batch than their shuffled place.

        Vectorised over all batches at once: the shuffled rows are cut into batches, and a row that shares a text
        with an earlier row of its batch leaves it. The rows that left then try the holes, each round in another
        random order, where a newcomer that clashes leaves again, until every hole is filled or the rounds stop
        placing rows. Whatever is left (rows that fit nowhere, batches with holes, the final partial batch) is
        filled row by row as before: a clashing row waits for a later batch, and at the end waiting rows are
        swapped into recent full batches, so only batches of rows that fit nowhere come out short. Without shared
        texts nothing moves and the batches are the shuffled order cut in pieces.
        """
        size = self.batch_size * self.num_replicas
        num_rows = len(self.row_texts)
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch)).numpy()
        rng = np.random.default_rng([self.seed, self.epoch])
        full = num_rows // size
        slots = order[: full * size].copy()  # slot s belongs to batch s // size; -1 is a hole
        holes = self._clashing(slots, np.arange(full), np.arange(full * size))
        pending = np.concatenate([slots[holes], order[full * size :]])
        moved = set(slots[holes].tolist())
        slots[holes] = -1
        stalled = 0
        while len(holes) and len(pending) and stalled < STALLED_ROUNDS:
            n = min(len(holes), len(pending))
            targets, holes = np.split(holes[rng.permutation(len(holes))], [n])
            slots[targets] = pending[:n]
            lost = self._clashing(slots, np.unique(targets // size), targets)
            pending = np.concatenate([slots[lost], pending[n:]])
            slots[lost] = -1
            holes = np.concatenate([holes, lost])
            stalled = stalled + 1 if len(lost) == n else 0
        batches = slots.reshape(full, size)
        complete = (batches >= 0).all(axis=1)
        leftover = np.concatenate([batches[~complete].ravel(), pending])
        batches = batches[complete].tolist()
        deferred = self._fill_in_order(leftover[leftover >= 0].tolist(), batches, size, moved)
        batches += deferred
        if self.drop_last and batches and len(batches[-1]) < size:
            batches.pop()
        return batches, moved

    def _within_budget(self, slices: list[list[int]]) -> list[list[list[int]]]:
        """One batch's rank ``slices`` as steps of at most ``max_tokens`` tokens on every rank: the fewest steps the
        fullest rank needs, each rank's slice cut into that many runs as even as that allows (the smallest largest
        run). A rank with fewer rows than the steps needed leaves every rank's surplus rows out (only possible when
        rows hold over half the budget); a row over the budget on its own is refused by the data module."""
        if self.max_tokens is None or all(self.row_tokens[part].sum() <= self.max_tokens for part in slices):
            return [slices]
        steps = max(len(budget_runs(self.row_tokens[part], self.max_tokens)) for part in slices)
        steps = min(steps, min(len(part) for part in slices))
        if not steps:  # a rank has no row: the step is left out whole
            return [slices]
        runs = []
        for part in slices:
            tokens = self.row_tokens[part]
            while len(budget_runs(tokens, self.max_tokens)) > steps:
                part, tokens = part[:-1], tokens[:-1]
            runs.append(np.split(np.asarray(part, dtype=np.int64), even_runs(tokens, steps)[:-1]))
        return [[rank_runs[step].tolist() for rank_runs in runs] for step in range(steps)]

    def _clashing(self, slots: np.ndarray, batches: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Which ``candidates`` (slots of ``batches``) share a text with a row that comes first in their batch.

        Rows that are not candidates come first (they are placed); candidates come in the order given.
        """
        size = self.batch_size * self.num_replicas
        batch_slots = (batches[:, None] * size + np.arange(size)).ravel()
        batch_slots = batch_slots[slots[batch_slots] >= 0]
        rank = np.full(len(slots), -1, dtype=np.int64)
        rank[candidates] = np.arange(len(candidates))
        texts = self.row_texts.take(slots[batch_slots])
        owner = np.repeat(batch_slots, texts.lengths)  # [T] the slot of each text
        key = (owner // size) * (int(np.max(texts.values, initial=0)) + 1) + np.asarray(texts.values)
        order = np.lexsort((rank[owner], key))
        key, owner = key[order], owner[order]
        repeated = (key[1:] == key[:-1]) & (owner[1:] != owner[:-1])
        clashing = np.zeros(len(slots), dtype=bool)
        clashing[owner[1:][repeated]] = True
        return candidates[clashing[candidates]]

    def _fill_in_order(self, rows: list[int], batches: list[list[int]], size: int, moved: set[int]) -> list[list[int]]:
        """Batches of ``rows`` filled one row at a time, after ``batches`` (whose last full ones take swaps).

        A row that clashes with the batch being filled waits in a queue of deferred rows, which get the first try
        at the next batch (the first ``LOOKAHEAD`` of them, so a text shared by a large part of the data costs a
        bounded scan per batch). When the rows run out, deferred rows that still clash with each other are swapped
        into recent full batches for rows that fit the batch being filled.
        """
        recent = deque(((batch, self._texts_of(batch)) for batch in batches[-SWAP_WINDOW:]), maxlen=SWAP_WINDOW)
        texts = {row: frozenset(self.row_texts.row(row).tolist()) for row in rows}
        for batch, _ in recent:
            texts.update((row, frozenset(self.row_texts.row(row).tolist())) for row in batch)
        lookahead = max(LOOKAHEAD, 4 * size)
        filled: list[list[int]] = []
        deferred: deque[int] = deque()
        swapping = True  # until a short batch cannot be filled by swaps: its rows fit nowhere
        position = 0
        while position < len(rows) or deferred:
            batch: list[int] = []
            seen: set[int] = set()
            waiting = []
            while deferred and len(waiting) < lookahead and len(batch) < size:
                row = deferred.popleft()
                if seen.isdisjoint(texts[row]):
                    batch.append(row)
                    seen.update(texts[row])
                else:
                    waiting.append(row)
            while len(batch) < size and position < len(rows):
                row = rows[position]
                position += 1
                if seen.isdisjoint(texts[row]):
                    batch.append(row)
                    seen.update(texts[row])
                else:
                    deferred.append(row)
                    moved.add(row)
            if len(batch) < size and (waiting or deferred) and swapping:
                # The rows have run out: every deferred row (up to the lookahead) is a candidate.
                waiting += [deferred.popleft() for _ in range(min(lookahead - len(waiting), len(deferred)))]
                waiting = self._swap_into_recent(batch, seen, waiting, recent, size, texts)
                swapping = len(batch) == size
            deferred.extendleft(reversed(waiting))
            filled.append(batch)
            if len(batch) == size:
                recent.append((batch, seen))
        return filled

    def _texts_of(self, batch: list[int]) -> set[int]:
        return set(np.asarray(self.row_texts.take(batch).values).tolist())

    def _swap_into_recent(
        self,
        batch: list[int],
        seen: set[int],
        waiting: list[int],
        recent: deque[tuple[list[int], set[int]]],
        batch_size: int,
        texts: dict[int, frozenset[int]],
    ) -> list[int]:
        """Fills ``batch`` by swaps: a waiting row goes into a recent full batch whose one clashing row (or any
        row, if none clashes) fits ``batch`` and moves there. Returns the rows still waiting, in order."""
        still_waiting = []
        for row in waiting:
            if len(batch) == batch_size:
                still_waiting.append(row)
                continue
            for full, full_texts in reversed(recent):
                common = texts[row] & full_texts
                clashing = [x for x in full if not texts[x].isdisjoint(common)] if common else full
                if len(clashing) > 1 and common:
                    continue
                out = next((x for x in clashing if seen.isdisjoint(texts[x])), None)
                if out is None:
                    continue
                full[full.index(out)] = row
                full_texts -= texts[out]
                full_texts |= texts[row]
                batch.append(out)
                seen.update(texts[out])
                break
            else:
                still_waiting.append(row)
        return still_waiting


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
