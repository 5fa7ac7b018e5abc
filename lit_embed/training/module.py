"""The LightningModule: an encoder, a contrastive loss per task, and the training step that joins them.

It serves full finetuning (every encoder weight), adapters (an :class:`~lit_embed.models.adapted.AdaptedEncoder`,
whose only trainable weights are its head) and LoRA (an :class:`~lit_embed.models.encoder.Encoder` with LoRA layers,
whose checkpoints hold only those layers' weights) alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.optim import Optimizer

from lit_embed.batch import PairBatch, pair_batches
from lit_embed.data.datamodule import trainer_data
from lit_embed.errors import LitEmbedError, NonFiniteLossError, check, is_bool
from lit_embed.losses.base import EmbeddingLoss
from lit_embed.losses.mnrl import MultipleNegativesRankingLoss
from lit_embed.losses.rerank import RerankLoss
from lit_embed.models.encoder import Encoder
from lit_embed.models.lora import lora_config, lora_weight_names
from lit_embed.models.reranker import Reranker
from lit_embed.training.nonfinite import (
    MAX_UNREAD_STEPS,
    NonFiniteSteps,
    SkippedStep,
    nonfinite_on_host,
    skips_on_device,
)
from lit_embed.training.optim import (
    DEFAULT_OPTIMIZER,
    LinearWarmupDecay,
    OptimizerFactory,
    SchedulerFactory,
    check_optimization,
)
from lit_embed.training.steps import GradCache, plain_step, split_step


class EmbeddingFinetuneModule(L.LightningModule):
    """Trains an encoder so each query embeds closest to its own document among all documents of the batch.

    Args:
        encoder: texts -> embeddings: an :class:`~lit_embed.models.encoder.Encoder`, or an
            :class:`~lit_embed.models.adapted.AdaptedEncoder` for adapter training.
        loss: an :class:`~lit_embed.losses.base.EmbeddingLoss` (default: MNRL, scale 20); for multi-task data,
            ``{task name: loss}``. A :class:`~lit_embed.training.steps.GradCache` in it (``loss=cached_mnrl``) is the
            task's step: it embeds the batch for the loss it holds.
        optimizer: ``optimizer(param_groups) -> Optimizer`` (a Hydra partial); default AdamW, lr 2e-5, decay 0.01.
        scheduler: ``scheduler(optimizer, total_steps=...) -> LRScheduler`` stepped per optimizer step,
            or None for a constant learning rate.
        skip_nonfinite: on a NaN/inf loss, skip that batch (counted in ``train/skipped_batches``) instead of
            stopping the run with an error that names the step and the batch's query ids. A fused optimizer (the
            default AdamW) skips such a step on the device and the error comes at the next log step or checkpoint,
            with no host sync in the step (:mod:`lit_embed.training.nonfinite`); any other is checked on the host
            after the loss, one sync a step.
        compile: ``torch.compile`` the encoder's transformer (:meth:`~lit_embed.models.encoder.Encoder.
            compile_transformer`): fewer, fused kernels for launch-bound small encoders on a GPU.
        gradient_checkpointing: recompute each layer's activations in backward instead of keeping them (less
            memory, about a third more compute, the same loss and gradients). Both are training switches, as in
            Hugging Face's ``TrainingArguments``: the exported model is the same either way.
    """

    def __init__(
        self,
        encoder: nn.Module,
        loss: EmbeddingLoss | Mapping[str, EmbeddingLoss] | None = None,
        optimizer: OptimizerFactory = DEFAULT_OPTIMIZER,
        scheduler: SchedulerFactory | None = LinearWarmupDecay,
        skip_nonfinite: bool = False,
        compile: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        switches = {
            "skip_nonfinite": skip_nonfinite,
            "compile": compile,
            "gradient_checkpointing": gradient_checkpointing,
        }
        for key, value in switches.items():
            check(is_bool(value), key, value, "true or false")
        check_optimization(optimizer, scheduler)
        if compile and isinstance(encoder, Reranker):
            raise LitEmbedError(
                "method.compile is for encoders; a reranker trains uncompiled: set method.compile=false"
            )
        if (compile or gradient_checkpointing) and not isinstance(encoder, (Encoder, Reranker)):
            raise LitEmbedError(
                "method.compile and method.gradient_checkpointing act on a transformer, and this encoder "
                f"({type(encoder).__name__}) trains none (an adapter's head runs on cached embeddings): set both to "
                "false."
            )
        if gradient_checkpointing:
            encoder.enable_gradient_checkpointing()
        if compile:
            encoder.compile_transformer()
        self.encoder = encoder
        loss = loss if loss is not None else MultipleNegativesRankingLoss()
        losses = dict(loss) if isinstance(loss, Mapping) else {"": loss}
        # Each task's step (None: the plain one) and loss; a step has no weights, so it is no submodule.
        self.steps: dict[str, GradCache | None] = {}
        for task, task_loss in losses.items():
            self.steps[task], losses[task] = split_step(task_loss)
            check_loss_fits(encoder, losses[task], task)
        self.loss = nn.ModuleDict(losses) if isinstance(loss, Mapping) else losses[""]
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.skip_nonfinite = skip_nonfinite
        self.skipped_batches = 0
        self.nonfinite: NonFiniteSteps | None = None  # set at the start of training where the optimizer skips
        self._drop_gradients = False  # this step's loss was not finite on some rank: its optimizer step changes nothing
        self.schedule_total_steps: int | None = None  # the steps the learning-rate schedule spans
        # The run length and schedule total of the checkpoint a run resumes from (configure_optimizers reads them;
        # under FSDP the checkpoint is read after it, and the schedule spans the estimate).
        self._resumed_schedule: dict[str, Any] | None = None
        # Under LoRA a checkpoint holds the LoRA weights, not the frozen base that the model config loads again.
        # Named now, before a strategy wraps the encoder.
        self.lora_config = lora_config(encoder)
        if self.lora_config is None and getattr(encoder, "config", {}).get("load_in_4bit"):
            # 4-bit weights take no gradient: all but the few unquantized layers would silently stay as loaded.
            raise LitEmbedError(
                "model.load_in_4bit=true loads the base in 4 bits, which only LoRA can train on: add method=lora "
                "(QLoRA), or set model.load_in_4bit=false to finetune every weight."
            )
        lora_names = lora_weight_names(encoder)
        self.frozen_weights: frozenset[str] = frozenset()
        self._lora_weights = frozenset(f"encoder.{n}" for n in lora_names or ())
        if lora_names is not None:
            self.frozen_weights = frozenset(f"encoder.{n}" for n in encoder.state_dict() if n not in lora_names)
            self.strict_loading = False  # the frozen weights are left out of checkpoints on purpose

    def on_train_start(self) -> None:
        plugin = self.trainer.precision_plugin
        scaled = isinstance(plugin, MixedPrecision) and plugin.scaler is not None
        self.nonfinite = NonFiniteSteps() if skips_on_device(self.trainer.optimizers[0], scaled) else None
        # Losses that work on the training texts ahead (GIST's guide embeds each once) get them here, where the
        # encoder is on its device. A data module that does not list them leaves such a loss to take them per batch.
        data = trainer_data(self.trainer)
        texts_by_task = (data.training_texts() if data is not None else {}) or {task: {} for task in self.steps}
        for task, texts in texts_by_task.items():
            for loss in self.loss_for(task).modules():
                if isinstance(loss, EmbeddingLoss):
                    loss.prepare(self.encoder, texts)

    def training_step(self, batch: PairBatch | Mapping[str, PairBatch], batch_idx: int) -> Tensor | None:
        tasks = pair_batches(batch)  # one task's pairs, or every task's when a step trains them all
        losses = {pairs.task: self.task_loss(pairs) for pairs in tasks}
        loss = torch.stack(list(losses.values())).sum()
        num_pairs = sum(len(pairs) for pairs in tasks)
        query_ids = [i for pairs in tasks for i in pairs.query_ids]
        if self.nonfinite is not None:  # checked on the device; the optimizer skips a non-finite step itself
            self.nonfinite.record(self.global_step, batch_idx, self.current_epoch, query_ids, loss)
        # A host sync: this optimizer cannot skip on the device.
        elif skipped := nonfinite_on_host(loss, self.global_step, batch_idx, self.current_epoch, query_ids):
            self._handle_nonfinite(skipped)
            self.log("train/skipped_batches", float(self.skipped_batches), batch_size=num_pairs)
            # Backward still runs, so that under DDP every rank enters the gradient all-reduce (Lightning refuses a
            # skipped training_step there); every rank then drops the gradients before its optimizer step.
            self._drop_gradients = True
            return loss
        # With gather_across_devices each rank's loss is weighted by its share of the batch; their mean is the loss.
        sync = self.trainer.world_size > 1
        self.log("train/loss", loss, prog_bar=True, batch_size=num_pairs, sync_dist=sync)
        if isinstance(self.loss, nn.ModuleDict):
            # NaN for a task this step did not train on: Lightning would otherwise repeat its last value.
            for task in self.loss:
                task_loss = losses.get(task, torch.tensor(float("nan"), device=loss.device))
                self.log(f"train/loss/{task}", task_loss, batch_size=num_pairs, sync_dist=sync)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], prog_bar=False, batch_size=num_pairs)
        for name, value in self.step_metrics(tasks).items():
            self.log(f"train/{name}", value.float(), batch_size=num_pairs, sync_dist=sync, reduce_fx="sum")
        return loss

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        if self._drop_gradients:  # torch's optimizers leave a weight without a gradient, and its moments, as they are
            for group in optimizer.param_groups:
                for weight in group["params"]:
                    weight.grad = None
            self._drop_gradients = False
        if self.nonfinite is not None:
            gradients = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self.nonfinite.flag(optimizer, self.global_step, gradients)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Lightning reads the logged values on its log steps: what the device skipped is read with them.
        every = max(1, self.trainer.log_every_n_steps)
        if self.nonfinite is not None and (
            self.global_step % every == 0 or self.nonfinite.unread_steps() >= MAX_UNREAD_STEPS
        ):
            self.read_nonfinite()
            if self.skipped_batches:
                self.log("train/skipped_batches", float(self.skipped_batches))

    def on_train_epoch_end(self) -> None:
        self.read_nonfinite()

    def read_nonfinite(self) -> None:
        """Reads the steps the device skipped since the last read (a host sync): raises, or counts them."""
        skipped = self.nonfinite.read() if self.nonfinite is not None else None
        if skipped is not None:
            self._handle_nonfinite(skipped)

    def _handle_nonfinite(self, skipped: SkippedStep) -> None:
        if not self.skip_nonfinite:
            what = (
                f"the loss is {skipped.loss}"
                if not math.isfinite(skipped.loss)
                else f"the gradients are not finite (the loss is {skipped.loss})"
            )
            raise NonFiniteLossError(
                f"{what} at step {skipped.step} (batch {skipped.batch_idx} of epoch "
                f"{skipped.epoch}), on the batch with query ids {skipped.query_ids}. Check those "
                "texts, lower optimizer.lr, or set method.skip_nonfinite=true to skip such batches. "
                "That step changed no weight; the checkpoints written so far are intact and resume=true continues "
                "from the last one."
            )
        self.skipped_batches += skipped.count

    def task_loss(self, pairs: PairBatch) -> Tensor:
        """The loss of one task's pairs, by that task's step."""
        loss = self.loss_for(pairs.task)
        if pairs.positives is not None and not loss.scores_several_positives():
            raise LitEmbedError(
                f"{type(loss).__name__} scores one positive per query, but the rows hold several "
                "(data.multi_positive=true): train them with loss=mnrl, cached_mnrl or matryoshka, or set "
                "data.multi_positive=false."
            )
        step = self.steps[pairs.task if isinstance(self.loss, nn.ModuleDict) else ""]
        if step is None:
            return plain_step(self.encoder, pairs, loss)
        return step(self.encoder, pairs, loss, loss_scale_of(self.trainer.precision_plugin))

    def loss_for(self, task: str) -> EmbeddingLoss:
        """The loss of one task (single-task data has one loss, for the task ``""``)."""
        if not isinstance(self.loss, nn.ModuleDict):
            return self.loss
        if task not in self.loss:
            raise LitEmbedError(f"no loss for the task {task!r}: the losses are for {sorted(self.loss)}.")
        return self.loss[task]

    def step_metrics(self, tasks: list[PairBatch]) -> dict[str, Tensor]:
        """What this step's losses measured besides the loss (GIST's masked candidates), summed over the tasks."""
        metrics: dict[str, Tensor] = {}
        # A wrapped loss (Matryoshka's) reports too: every EmbeddingLoss inside each task's loss.
        losses = [m for pairs in tasks for m in self.loss_for(pairs.task).modules() if isinstance(m, EmbeddingLoss)]
        for loss in losses:
            for name, value in loss.step_metrics().items():
                metrics[name] = metrics.get(name, 0) + value
        return metrics

    def configure_gradient_clipping(
        self, optimizer: Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        # Lightning's mixed-precision plugin refuses to clip for a fused optimizer (which unscales fp16 gradients
        # itself). bf16 has no loss scaler: the gradients are the true ones, so clip them directly.
        plugin = self.trainer.precision_plugin
        sharded = self.trainer.strategy.model
        if gradient_clip_val and gradient_clip_algorithm != "value" and isinstance(sharded, FullyShardedDataParallel):
            # Under FSDP each rank holds a shard of every gradient: the norm is the whole model's, which only FSDP's
            # own clip_grad_norm_ computes (Lightning's FSDP plugin refuses norm clipping).
            sharded.clip_grad_norm_(gradient_clip_val)
            return
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def checkpoint_weights(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """What of ``state_dict`` a checkpoint holds: all of it, or under LoRA all but the frozen base."""
        return {name: value for name, value in state_dict.items() if name not in self.frozen_weights}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lets `python -m lit_embed.export CKPT OUT` rebuild the encoder without the run's config.
        checkpoint["encoder_config"] = self.encoder.config
        self.read_nonfinite()  # a step the device skipped is counted (or stops the run) before it is saved
        checkpoint["skipped_batches"] = self.skipped_batches
        checkpoint["schedule_length"] = {**self._run_length(), "total_steps": self.schedule_total_steps}
        if self.lora_config is not None:
            checkpoint["lora_config"] = self.lora_config
            checkpoint["state_dict"] = self.checkpoint_weights(checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_batches = checkpoint.get("skipped_batches", 0)
        self._resumed_schedule = checkpoint.get("schedule_length")
        found = {name for name in checkpoint["state_dict"] if name.startswith("encoder.")}
        expected = self._lora_weights
        if expected and found != expected:  # Lightning loads a LoRA checkpoint without strictness: check it here
            raise LitEmbedError(
                f"the checkpoint's encoder weights are not this run's LoRA weights ({len(expected - found)} "
                f"missing, {len(found - expected)} not in this model, e.g. {sorted(expected ^ found)[:2]}): resume "
                "with the model and lora.* settings it was trained with."
            )

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self._param_groups())
        for group in optimizer.param_groups:  # before the schedule reads each group's initial rate
            group["lr"] *= group.pop("lr_scale", 1.0)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise LitEmbedError(
                "the learning-rate schedule needs a finite run: set trainer.max_epochs or trainer.max_steps."
            )
        saved = self._resumed_schedule
        if saved is not None and {k: saved.get(k) for k in ("max_steps", "max_epochs")} == self._run_length():
            # An exact resume keeps its schedule's total: the estimate counts the batches of the epoch it resumes
            # in, which can differ from the first epoch's by a short batch or two (NoDuplicatesBatchSampler).
            total_steps = saved["total_steps"]
        self.schedule_total_steps = int(total_steps)
        scheduler = self.scheduler_factory(optimizer, total_steps=self.schedule_total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _run_length(self) -> dict[str, int | None]:
        return {"max_steps": self.trainer.max_steps, "max_epochs": self.trainer.max_epochs}

    def _param_groups(self) -> list[dict[str, Any]]:
        # Biases and LayerNorm weights are not decayed, as in BERT and sentence-transformers' Trainer.
        decay, no_decay = [], []
        # A fresh score head (a reranker started from an encoder) learns at its own rate: at the encoder's, a random
        # head barely moves in the few hundred steps of a small dataset.
        fresh = {id(param) for param in getattr(self.encoder, "fresh_parameters", list)()}
        head_scale = getattr(self.encoder, "head_lr_scale", 1.0)
        head = []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if id(param) in fresh and head_scale != 1.0:
                head.append(param)
            else:
                (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        return groups + ([{"params": head, "lr_scale": head_scale}] if head else [])


def check_loss_fits(encoder: nn.Module, loss: nn.Module, task: str = "") -> None:
    """Refuses a reranker's loss on an encoder, or an embedding loss on a reranker, before anything trains."""
    reads_pairs = bool(getattr(encoder, "reads_pairs", False))
    if isinstance(loss, RerankLoss) == reads_pairs:
        return
    where = f" (data.tasks.{task})" if task else ""
    if reads_pairs:
        raise LitEmbedError(
            f"task=rerank trains a reranker, and {type(loss).__name__}{where} is an embedding loss: use "
            "loss=rerank_bce, rerank_ce, rerank_mnrl, rerank_lambda or rerank_margin_mse."
        )
    raise LitEmbedError(
        f"{type(loss).__name__}{where} is a reranker's loss, and the model is an encoder: add task=rerank, or use an "
        "embedding loss (loss=mnrl ...)."
    )


def loss_scale_of(plugin: Any) -> float:
    """fp16's current loss scale (a host read, as fp16's scaler makes every step), 1 without one."""
    scaler = plugin.scaler if isinstance(plugin, MixedPrecision) else None
    return float(scaler.get_scale()) if scaler is not None else 1.0
