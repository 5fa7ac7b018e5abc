"""The optimizer and learning-rate schedule: their defaults (one place), the schedule, and an early check."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from lit_embed.errors import InvalidValueError, LitEmbedError, check, is_bool, is_number

OptimizerFactory = Callable[..., Optimizer]

# AdamW as sentence-transformers and LlamaIndex finetune with it; conf/train.yaml spells out the same values.
OPTIMIZER_DEFAULTS = {"lr": 2e-5, "weight_decay": 0.01, "fused": True}
DEFAULT_OPTIMIZER = partial(torch.optim.AdamW, **OPTIMIZER_DEFAULTS)


class SchedulerFactory(Protocol):
    """``scheduler(optimizer, total_steps=N) -> LRScheduler``: a Hydra partial, or a LightningCLI ``class_path``
    whose ``init_args`` leave out ``optimizer`` and ``total_steps`` (jsonargparse reads this signature)."""

    def __call__(self, optimizer: Optimizer, /, total_steps: int) -> LRScheduler: ...


class LinearWarmupDecay(LambdaLR):
    """Linear warmup from 0 to the peak over ``warmup_ratio`` of the steps, then linear decay to 0 at the end.

    ``warmup_steps = int(total_steps * warmup_ratio)``, as LlamaIndex and sentence-transformers compute it. A class
    rather than a function, so Hydra (``_partial_``) and LightningCLI (``class_path``) configure it the same way.

    Args:
        optimizer: the optimizer whose learning rate is scheduled.
        total_steps: optimizer steps of the whole run (the module passes it).
        warmup_ratio: fraction of the steps spent warming up.
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_ratio: float = 0.1) -> None:
        check(
            is_number(warmup_ratio) and 0 <= warmup_ratio <= 1,
            "warmup_ratio",
            warmup_ratio,
            "a fraction of the steps between 0 and 1",
        )
        self.total_steps = total_steps
        self.warmup_steps = int(total_steps * warmup_ratio)
        super().__init__(optimizer, self.factor)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continues the saved schedule's step count on this schedule's length.

        A resumed run of another length (``trainer.max_epochs`` / ``max_steps``) is built for its own total, so its
        learning rate goes on from the step reached instead of staying at the old run's end (0 after its decay).
        Unchanged settings build the same total, and continue exactly.
        """
        length = {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps}
        super().load_state_dict(state_dict)
        self.__dict__.update(length)
        # The optimizer was restored with the rate of the saved schedule's next step: the one this schedule gives
        # that step (the same number when the length is the same) is what the next step must use.
        self._last_lr = [base * self.factor(self.last_epoch) for base in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))


def check_optimization(optimizer: OptimizerFactory, scheduler: SchedulerFactory | None) -> None:
    """Builds both on a stand-in weight, so a bad setting fails before any model is trained.

    The optimizers' own checks (torch's ``Invalid learning rate: -1``) become a :class:`LitEmbedError`.
    """
    weight = torch.nn.Parameter(torch.zeros(1))
    settings = getattr(optimizer, "keywords", {})  # a Hydra partial's arguments; a LightningCLI factory has none here
    if "lr" in settings:
        lr = settings["lr"]
        check(is_number(lr) and lr > 0, "optimizer.lr", lr, "a learning rate > 0, e.g. 2e-5")
    for name in ("fused", "foreach", "amsgrad", "maximize", "capturable", "differentiable"):
        value = settings.get(name)
        check(value is None or is_bool(value), f"optimizer.{name}", value, "true, false or null")
    try:
        built = optimizer([{"params": [weight]}])
    except (ValueError, TypeError, RuntimeError) as err:
        raise LitEmbedError(
            f"the optimizer cannot be built from its settings: {err}. Fix the optimizer setting it names "
            "(optimizer.lr must be > 0, optimizer.weight_decay >= 0)."
        ) from None
    if scheduler is not None:
        try:
            scheduler(built, total_steps=10)
        except InvalidValueError as err:
            raise InvalidValueError(f"scheduler.{err.key}", err.value, err.allowed) from None
        except (ValueError, TypeError) as err:
            raise LitEmbedError(f"the learning-rate schedule cannot be built from its settings: {err}.") from None
