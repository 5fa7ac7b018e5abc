"""Several training sets, each with its own loss, in one run (sentence-transformers' ``train_objectives``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from lightning.pytorch.utilities import CombinedLoader
from torch import nn
from torch.utils.data import DataLoader

from lit_embed.batch import PairBatch
from lit_embed.data.datamodule import (
    PairCollator,
    PairDataModule,
    QAPairDataModule,
    distributed_position,
    index_dataloader,
)
from lit_embed.data.formats import load_dataset
from lit_embed.data.sampler import TaskSchedule
from lit_embed.data.schema import QADataset
from lit_embed.data.tokens import TextTokenizer
from lit_embed.errors import DataFormatError, InvalidValueError

# One task per step, as sentence-transformers' multi-dataset samplers do, or a batch of every task each step.
ONE_TASK_MODES = ("round_robin", "proportional", "sequential")
EVERY_TASK_MODES = ("max_size_cycle", "min_size")  # Lightning's CombinedLoader modes
Mode = Literal["round_robin", "proportional", "sequential", "max_size_cycle", "min_size"]


class TaskCollator:
    """Collates a batch of shared-space indices with its task's collator (the batch carries the task's name)."""

    def __init__(self, collators: list[PairCollator], offsets: list[int]):
        self.collators = collators
        self.offsets = offsets

    def __call__(self, indices: list[int]) -> PairBatch:
        task = max(t for t, offset in enumerate(self.offsets) if offset <= indices[0])
        return self.collators[task]([i - self.offsets[task] for i in indices])


class MultiTaskDataModule(PairDataModule):
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
            raise InvalidValueError("mode", mode, f"one of {', '.join(ONE_TASK_MODES + EVERY_TASK_MODES)}")
        if not tasks:
            raise DataFormatError("data.tasks is empty: list at least one task with its data and loss.")
        for name, task in tasks.items():
            if not isinstance(task.get("data"), QAPairDataModule) or not isinstance(task.get("loss"), nn.Module):
                raise DataFormatError(
                    f"data.tasks.{name} needs a `data:` (a QAPairDataModule config) and a `loss:` (a loss config)."
                )
        self.tasks = {name: task["data"] for name, task in tasks.items()}
        for name, data in self.tasks.items():
            data.task = name
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

    @property
    def num_training_pairs(self) -> int:
        """Training rows of every task, known after :meth:`prepare_data`."""
        return sum(data.num_training_pairs for data in self.tasks.values())

    def task_modules(self) -> list[PairDataModule]:
        return list(self.tasks.values())

    def skipped_records(self) -> dict[str, dict[str, Any]]:
        records = {path: report for data in self.tasks.values() for path, report in data.skipped_records().items()}
        if self.val_dataset is not None and self.val_dataset.skipped:
            records[str(self.val_path)] = self.val_dataset.skipped.as_dict()
        return records

    def data_identity(self) -> dict[str, dict[str, Any]]:
        return {where: what for data in self.tasks.values() for where, what in data.data_identity().items()}

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        self.tokenize(self.trainer.lightning_module.encoder)

    def tokenize(self, tokenizer: TextTokenizer) -> None:
        for data in self.tasks.values():
            if not data.tokenized:
                data.tokenize(tokenizer)

    def training_texts(self) -> dict[str, dict[str, list[str]]]:
        return {task: texts for data in self.tasks.values() for task, texts in data.training_texts().items()}

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        rank, world = distributed_position(self.trainer)
        samplers = [data.batch_sampler(rank, world) for data in self.tasks.values()]
        if self.mode in EVERY_TASK_MODES:
            if self._resume_at is not None:  # a shorter task starts over: it is at step % its length
                epoch, done = self._resume_at
                for sampler in samplers:
                    sampler.resume_at(epoch, done % max(1, len(sampler)))
            loaders = {name: data.loader(s) for (name, data), s in zip(self.tasks.items(), samplers, strict=True)}
            return CombinedLoader(loaders, mode=self.mode)
        sizes = [data.num_training_pairs for data in self.tasks.values()]
        offsets = [sum(sizes[:t]) for t in range(len(sizes))]
        schedule = TaskSchedule(samplers, offsets, self.mode, self.seed)
        if self._resume_at is not None:
            schedule.resume_at(*self._resume_at)
        collator = TaskCollator([data.collator for data in self.tasks.values()], offsets)
        workers = max(data.batch_settings.num_workers for data in self.tasks.values())
        pin_memory = any(data.batch_settings.pin_memory for data in self.tasks.values())
        return index_dataloader(sum(sizes), schedule, collator, workers, self.seed, pin_memory)
