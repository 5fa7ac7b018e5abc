"""Non-finite steps found on the device, so that the training step never waits for it.

A fused optimizer (AdamW's default here) takes a ``found_inf`` flag, as fp16's loss scaler sets it: the step is
then skipped on the device, weights, moments and step count untouched. The flag comes from the gradients after
DDP's all-reduce and is itself reduced over the ranks, so every rank skips the same steps. What was skipped is
read on the host only where the run waits for the device anyway: every ``log_every_n_steps``, before a checkpoint is
written and at the end of an epoch. Any other optimizer is checked on the host, every step, alike on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim import Optimizer

from lit_embed.internals import steps_check_nonfinite

# Steps kept on the host between reads at most (a read comes sooner with the default logging).
MAX_UNREAD_STEPS = 1000


@dataclass(frozen=True)
class SkippedStep:
    """The first step of a read whose loss or gradients were not finite."""

    step: int
    batch_idx: int
    epoch: int
    query_ids: list[str]
    loss: float
    count: int  # non-finite steps since the last read


def nonfinite_on_host(loss: Tensor, step: int, batch_idx: int, epoch: int, query_ids: list[str]) -> SkippedStep | None:
    """The step, when its loss is not finite on any process, checked on the host (one read a step): for optimizers
    that cannot skip on the device.

    Every process decides alike: one that skipped its backward alone would leave the others waiting in DDP's
    gradient all-reduce. The step found names the loss and query ids of the batches that were not finite, wherever
    they were (one more exchange, only then).
    """
    found = (~torch.isfinite(loss.detach())).to(torch.int32).reshape(1)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)
    if not found.item():
        return None
    batches = [(loss.item(), query_ids)]
    if distributed:
        batches = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(batches, (loss.item(), query_ids))
    nonfinite = [(value, ids) for value, ids in batches if not math.isfinite(value)]
    return SkippedStep(step, batch_idx, epoch, [i for _, ids in nonfinite for i in ids], nonfinite[0][0], 1)


def skips_on_device(optimizer: Optimizer, loss_scaled: bool) -> bool:
    """Whether ``optimizer`` can skip a step on the device: a fused torch optimizer, with no loss scaler of its own
    (fp16's scaler sets the same flag, and skips non-finite steps its own way)."""
    return steps_check_nonfinite(optimizer) and not loss_scaled


class NonFiniteSteps:
    """Flags non-finite steps on the device and tells, when read, the first one since the last read."""

    def __init__(self) -> None:
        self._batches: dict[int, tuple[int, int, list[str]]] = {}  # step -> (batch_idx, epoch, query ids)
        self._loss: Tensor | None = None  # this step's loss: the first non-finite one of its micro-batches
        self._count: Tensor | None = None  # non-finite steps since the last read
        self._first: Tensor | None = None  # [step, loss] of the first of them
        self._loss_step = -1

    def record(self, step: int, batch_idx: int, epoch: int, query_ids: list[str], loss: Tensor) -> None:
        """Notes a training step's batch (host) and loss (device), before its backward."""
        self._batches.setdefault(step, (batch_idx, epoch, query_ids))
        loss = loss.detach().float()
        if self._loss is None or self._loss_step != step:
            self._loss, self._loss_step = loss, step
        else:  # gradient accumulation: keep the first non-finite loss of the step
            self._loss = torch.where(torch.isfinite(self._loss), loss, self._loss)

    def flag(self, optimizer: Optimizer, step: int, gradients: list[Tensor]) -> None:
        """Sets the optimizer's ``found_inf`` for this step from its (all-reduced) gradients and loss."""
        device = gradients[0].device if gradients else torch.device("cpu")
        if self._count is None:
            self._count = torch.zeros((), device=device, dtype=torch.int64)
            self._first = torch.full((2,), -1.0, device=device, dtype=torch.float64)
        found = ~torch.isfinite(torch.nn.utils.get_total_norm(gradients)) if gradients else self._count < 0
        if self._loss is not None and self._loss_step == step:
            found = found | ~torch.isfinite(self._loss.to(device))
            loss = self._loss.to(device, torch.float64)
        else:
            loss = torch.full((), float("nan"), device=device, dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Sharded gradients (FSDP) differ between ranks: every rank skips when any found one (a device
            # collective, no host sync).
            found = found.to(torch.int32)
            torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)
            found = found.bool()
        first = found & (self._count == 0)
        self._first = torch.where(first, torch.stack([torch.full_like(loss, step), loss]), self._first)
        self._count = self._count + found
        optimizer.found_inf = found.float()  # read by the fused kernel; the step moves on when it is 0

    def unread_steps(self) -> int:
        return len(self._batches)

    def read(self) -> SkippedStep | None:
        """The first non-finite step since the last read (one host sync), or None; forgets what it read."""
        if self._count is None:
            self._batches.clear()
            return None
        count = int(self._count)
        found = None
        if count:
            step, loss = self._first.tolist()
            batch_idx, epoch, query_ids = self._batches.get(int(step), (-1, -1, []))
            found = SkippedStep(int(step), batch_idx, epoch, query_ids, loss, count)
            self._count.zero_()
            self._first.fill_(-1.0)
        self._batches.clear()
        return found
