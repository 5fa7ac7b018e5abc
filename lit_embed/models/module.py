"""The LightningModule for full-model contrastive finetuning."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from lit_embed.data.multitask import num_pairs, task_batches
from lit_embed.errors import LitEmbedError
from lit_embed.losses.cached import CachedLoss
from lit_embed.losses.mnrl import MultipleNegativesRankingLoss
from lit_embed.models.encoder import Encoder, embed_batch


class NonFiniteLossError(LitEmbedError):
    """The loss became NaN or infinite."""


OptimizerFactory = Callable[..., Optimizer]


class SchedulerFactory(Protocol):
    """``scheduler(optimizer, total_steps=N) -> LRScheduler``: a Hydra partial, or a LightningCLI ``class_path``
    whose ``init_args`` leave out ``optimizer`` and ``total_steps`` (jsonargparse reads this signature)."""

    def __call__(self, optimizer: Optimizer, /, total_steps: int) -> LRScheduler: ...


DEFAULT_OPTIMIZER = partial(torch.optim.AdamW, lr=2e-5, weight_decay=0.01, fused=True)


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
        self.total_steps = total_steps
        self.warmup_steps = int(total_steps * warmup_ratio)
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))


class EmbeddingFinetuneModule(L.LightningModule):
    """Trains an encoder so each query embeds closest to its own document among all documents of the batch.

    Args:
        encoder: texts -> embeddings (a sentence-transformers model).
        loss: ``loss(query_embeddings [B, D], document_embeddings [B + N, D]) -> scalar``, or a
            :class:`CachedLoss` (which embeds the batch itself); for multi-task data, ``{task name: loss}``.
        optimizer: ``optimizer(param_groups) -> Optimizer`` (a Hydra partial).
        scheduler: ``scheduler(optimizer, total_steps=...) -> LRScheduler`` stepped per optimizer step,
            or None for a constant learning rate.
        skip_nonfinite: on a NaN/inf loss, skip that batch (counted in ``train/skipped_batches``) instead of
            stopping the run with an error that names the step and the batch's query ids.
    """

    def __init__(
        self,
        encoder: Encoder,
        loss: nn.Module | Mapping[str, nn.Module] | None = None,
        optimizer: OptimizerFactory = DEFAULT_OPTIMIZER,
        scheduler: SchedulerFactory | None = LinearWarmupDecay,
        skip_nonfinite: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        if isinstance(loss, Mapping):
            loss = nn.ModuleDict(dict(loss))
        self.loss = loss if loss is not None else MultipleNegativesRankingLoss()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.skip_nonfinite = skip_nonfinite
        self.skipped_batches = 0

    def setup(self, stage: str) -> None:
        cached = any(isinstance(m, CachedLoss) for m in self.loss.modules())
        if cached and self.trainer.precision in ("16-mixed", "16-true"):
            raise LitEmbedError(
                "loss=cached_mnrl computes its gradients inside the step, where fp16's loss scaling cannot reach: "
                "use trainer.precision=bf16-mixed or 32-true."
            )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        losses = {task: self.task_loss(task, pairs) for task, pairs in task_batches(batch).items()}
        loss = torch.stack(list(losses.values())).sum()
        batch_size = num_pairs(batch)
        if not torch.isfinite(loss):
            if not self.skip_nonfinite:
                query_ids = [i for pairs in task_batches(batch).values() for i in pairs.get("query_ids", [])]
                raise NonFiniteLossError(
                    f"the loss is {loss.item()} at step {self.global_step} (batch {batch_idx} of epoch "
                    f"{self.current_epoch}), on the batch with query ids {query_ids}. Check those "
                    "texts, lower optimizer.lr, or set trainer.skip_nonfinite=true to skip such batches. "
                    "The checkpoints written so far are intact; resume=true continues from the last one."
                )
            self.skipped_batches += 1  # returning None makes Lightning skip this batch's backward and step
            self.log("train/skipped_batches", float(self.skipped_batches), batch_size=batch_size)
            return None
        # With gather_across_devices each rank's loss is weighted by its share of the batch; their mean is the loss.
        sync = self.trainer.world_size > 1
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=sync)
        if isinstance(self.loss, nn.ModuleDict):
            # NaN for a task this step did not train on: Lightning would otherwise repeat its last value.
            for task in self.loss:
                task_loss = losses.get(task, torch.tensor(float("nan"), device=loss.device))
                self.log(f"train/loss/{task}", task_loss, batch_size=batch_size, sync_dist=sync)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=False, batch_size=batch_size)
        return loss

    def task_loss(self, task: str, batch: dict[str, Any]) -> Tensor:
        """One task's loss on its pairs (single-task data has the one task ``""``)."""
        loss = self.loss
        if isinstance(loss, nn.ModuleDict):
            if task not in loss:
                raise LitEmbedError(f"no loss for the task {task!r}: the losses are for {sorted(loss)}.")
            loss = loss[task]
        if isinstance(loss, CachedLoss):
            return loss(self.encoder, batch)
        queries = embed_batch(self.encoder, batch["queries"])  # [B, D]
        documents = embed_batch(self.encoder, batch["documents"])  # [B + N, D]: positives, then hard negatives
        return loss(queries, documents)

    def configure_gradient_clipping(
        self, optimizer: Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        # Lightning's mixed-precision plugin refuses to clip for a fused optimizer (which unscales fp16 gradients
        # itself). bf16 has no loss scaler: the gradients are the true ones, so clip them directly.
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lets `python -m lit_embed.export CKPT OUT` rebuild the encoder without the run's config.
        checkpoint["encoder_config"] = self.encoder.config
        checkpoint["skipped_batches"] = self.skipped_batches

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_batches = checkpoint.get("skipped_batches", 0)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self._param_groups())
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise ValueError(
                "the learning-rate schedule needs a finite run: set trainer.max_epochs or trainer.max_steps."
            )
        scheduler = self.scheduler_factory(optimizer, total_steps=int(total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _param_groups(self) -> list[dict[str, Any]]:
        # Biases and LayerNorm weights are not decayed, as in BERT and sentence-transformers' Trainer.
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
