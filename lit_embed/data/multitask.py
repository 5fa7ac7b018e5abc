"""Several training sets, each with its own loss, in one run (sentence-transformers' ``train_objectives``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader, Sampler

from lit_embed.data.datamodule import (
    PairCollator,
    QAPairDataModule,
    ResumableDataModule,
    TextTokenizer,
    distributed_position,
    index_dataloader,
)
from lit_embed.data.formats import DataFormatError, QADataset, load_dataset
from lit_embed.data.sampler import NoDuplicatesBatchSampler

# One task per step, as sentence-transformers' multi-dataset samplers do, or a batch of every task each step.
ONE_TASK_MODES = ("round_robin", "proportional", "sequential")
EVERY_TASK_MODES = ("max_size_cycle", "min_size")  # Lightning's CombinedLoader modes
Mode = Literal["round_robin", "proportional", "sequential", "max_size_cycle", "min_size"]


def task_batches(batch: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A batch is one task's pairs (``{"queries": ..., ...}``), or ``{task name: pairs}`` for multi-task data."""
    return {"": batch} if "queries" in batch else batch


def num_pairs(batch: dict[str, Any]) -> int:
    """Training pairs in a batch, over all its tasks."""
    return sum(len(pairs["queries"]["order"]) for pairs in task_batches(batch).values())


class TaskSchedule(Sampler[list[int]]):
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
        self.samplers = samplers
        self.offsets = offsets
        self.mode = mode
        self.seed = seed
        self.epoch = 0
        self._resume_at: tuple[int, int] | None = None

    @property
    def sampler(self) -> TaskSchedule:
        # Lightning calls ``batch_sampler.sampler.set_epoch(epoch)`` at every epoch start.
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for sampler in self.samplers:
            sampler.set_epoch(epoch)

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Continues ``epoch`` after its first ``batches_done`` steps (exact resume)."""
        self.set_epoch(epoch)
        self._resume_at = (epoch, batches_done)

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

    def __iter__(self) -> Iterator[list[int]]:
        batches = [iter(sampler.batches()) for sampler in self.samplers]
        steps = ([self.offsets[t] + row for row in next(batches[t])] for t in self.order())
        start = 0
        if self._resume_at is not None and self._resume_at[0] == self.epoch:
            start, self._resume_at = self._resume_at[1], None
        for step, batch in enumerate(steps):
            if step >= start:
                yield batch

    def __len__(self) -> int:
        return len(self.order())


class TaskCollator:
    """Collates a batch of shared-space indices with its task's collator into ``{task name: pairs}``."""

    def __init__(self, names: list[str], collators: list[PairCollator], offsets: list[int]):
        self.names = names
        self.collators = collators
        self.offsets = offsets

    def __call__(self, indices: list[int]) -> dict[str, Any]:
        task = max(t for t, offset in enumerate(self.offsets) if offset <= indices[0])
        return {self.names[task]: self.collators[task]([i - self.offsets[task] for i in indices])}


class MultiTaskDataModule(ResumableDataModule):
    """Trains one encoder on several datasets at once, each with its own loss and batch size.

    For example QA pairs with in-batch negatives and triplets with hard negatives (see ``conf/data/multitask.yaml``).
    Each task keeps its own no-duplicates batches; ``train/loss/<task>`` is logged for each.

    Args:
        tasks: ``{name: {"data": QAPairDataModule, "loss": loss module}}``.
        mode: ``round_robin``, ``proportional`` or ``sequential`` give each step one task's batch (see
            :class:`TaskSchedule`); ``max_size_cycle`` and ``min_size`` give each step a batch of every task and
            sum their losses, through Lightning's ``CombinedLoader`` (an epoch lasts as long as the task with the
            most / the fewest batches; shorter tasks start over).
        val_path: validation data for IR evaluation (optional).
        seed: seed of the task order.
    """

    def __init__(
        self,
        tasks: Mapping[str, Mapping[str, Any]],
        mode: Mode = "round_robin",
        val_path: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if mode not in ONE_TASK_MODES + EVERY_TASK_MODES:
            raise DataFormatError(f"data.mode={mode!r} is not one of {', '.join(ONE_TASK_MODES + EVERY_TASK_MODES)}.")
        if not tasks:
            raise DataFormatError("data.tasks is empty: list at least one task with its data and loss.")
        for name, task in tasks.items():
            if not isinstance(task.get("data"), QAPairDataModule) or not isinstance(task.get("loss"), nn.Module):
                raise DataFormatError(
                    f"data.tasks.{name} needs a `data:` (a QAPairDataModule config) and a `loss:` (a loss config)."
                )
        self.tasks = {name: task["data"] for name, task in tasks.items()}
        self.losses = {name: task["loss"] for name, task in tasks.items()}
        self.mode = mode
        self.val_path = val_path
        self.seed = seed
        self.val_dataset: QADataset | None = None
        self._prepared = False

    def prepare_data(self) -> None:
        """Loads and checks every task's data and the validation set before anything trains."""
        if not self._prepared:
            for data in self.tasks.values():
                data.prepare_data()
            self.val_dataset = load_dataset(self.val_path) if self.val_path else None
            self._prepared = True

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        self.tokenize(self.trainer.lightning_module.encoder)

    def tokenize(self, tokenizer: TextTokenizer) -> None:
        for data in self.tasks.values():
            if not data.tokenized:
                data.tokenize(tokenizer)

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        rank, world = distributed_position(self.trainer)
        samplers = [data.batch_sampler(rank, world) for data in self.tasks.values()]
        if self.mode in EVERY_TASK_MODES:
            if self._resume_at is not None:  # a shorter task starts over: it is at step % its length
                epoch, done = self._resume_at
                for sampler in samplers:
                    sampler.resume_at(epoch, done % max(1, len(sampler)))
            loaders = {
                name: index_dataloader(data.num_rows, s, data.collator, data.num_workers, data.seed, data.pin_memory)
                for (name, data), s in zip(self.tasks.items(), samplers, strict=True)
            }
            return CombinedLoader(loaders, mode=self.mode)
        sizes = [data.num_rows for data in self.tasks.values()]
        offsets = [sum(sizes[:t]) for t in range(len(sizes))]
        schedule = TaskSchedule(samplers, offsets, self.mode, self.seed)
        if self._resume_at is not None:
            schedule.resume_at(*self._resume_at)
        collator = TaskCollator(list(self.tasks), [data.collator for data in self.tasks.values()], offsets)
        workers = max(data.num_workers for data in self.tasks.values())
        pin_memory = any(data.pin_memory for data in self.tasks.values())
        return index_dataloader(sum(sizes), schedule, collator, workers, self.seed, pin_memory)
