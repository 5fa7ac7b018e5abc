"""Retrieval evaluation of the encoder before, during and after training (:mod:`lit_embed.evaluation.retrieval`)."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lit_embed.data.datamodule import trainer_data
from lit_embed.data.formats import load_dataset
from lit_embed.data.schema import QADataset
from lit_embed.distributed import full_parameters
from lit_embed.errors import LitEmbedError, check, is_int
from lit_embed.evaluation.retrieval import evaluate_encoder, evaluate_encoder_and_rank

log = logging.getLogger(__name__)


def fingerprint(dataset: QADataset) -> str:
    """A short hash of the dataset's query and document ids, in order: what a ranking's rows and hits refer to."""
    ids = "\n".join(dataset.queries) + "\0" + "\n".join(dataset.corpus)
    return hashlib.sha256(ids.encode("utf-8")).hexdigest()[:16]


class IREvaluationCallback(L.Callback):
    """Evaluates retrieval on the validation set at step 0, every ``evaluation_steps`` optimizer steps and at the end.

    Metrics are logged as ``val/<name>`` (``val/mrr@10``, ``val/ndcg@10`` ...) to every logger and put in
    ``trainer.callback_metrics`` so checkpointing can monitor them. A guard set (``guard_path``: general-domain
    queries the finetuning should not make worse) is scored at the same times and logged as ``guard/<name>``; weight
    merging rules out models that lose too much on it. ``history`` keeps every evaluation and
    ``rankings`` each one's per-query ranking in brief (the top hit and the rank of the first relevant document, 8
    bytes a query: what the run's report compares); both are saved in checkpoints, so a resumed run still reports
    the base model's numbers.

    Args:
        evaluation_steps: evaluate every this many optimizer steps (0 = only before and after training).
        batch_size: texts per encoder call.
        corpus_chunk_size: corpus rows scored at once (bounds memory for huge corpora).
        dataset: the validation set; None takes ``trainer.datamodule.val_dataset``.
        truncate_dim: score only the first this many embedding dimensions, e.g. a smaller size trained with
            ``loss=matryoshka`` (None = all). The logged metrics, and the checkpoint they select, are that size's.
        guard_path: a second QA file (any format ``load_dataset`` reads), evaluated with the validation set.
    """

    def __init__(
        self,
        evaluation_steps: int = 50,
        batch_size: int = 64,
        corpus_chunk_size: int = 50_000,
        dataset: QADataset | None = None,
        truncate_dim: int | None = None,
        guard_path: str | None = None,
    ) -> None:
        check(
            is_int(evaluation_steps) and evaluation_steps >= 0,
            "evaluation_steps",
            evaluation_steps,
            "a whole number of optimizer steps >= 0 (0 = only before and after training)",
        )
        check(is_int(batch_size) and batch_size >= 1, "batch_size", batch_size, "a whole number of texts >= 1")
        check(
            is_int(corpus_chunk_size) and corpus_chunk_size >= 1,
            "corpus_chunk_size",
            corpus_chunk_size,
            "a whole number of documents >= 1",
        )
        if truncate_dim is not None and not (is_int(truncate_dim) and truncate_dim >= 1):
            raise LitEmbedError(f"eval.truncate_dim must be a positive embedding size or null, got {truncate_dim}.")
        self.evaluation_steps = evaluation_steps
        self.batch_size = batch_size
        self.corpus_chunk_size = corpus_chunk_size
        self.dataset = dataset
        self.truncate_dim = truncate_dim
        # Read now, so that a bad file stops the run before training.
        self.guard = load_dataset(guard_path) if guard_path else None
        self.history: list[dict[str, Any]] = []
        # step -> {"rankings": [Q, 2] (see evaluate_encoder_and_rank), "dataset": fingerprint of the set ranked}
        self.rankings: dict[int, dict[str, Any]] = {}

    def metrics_at(self, step: int, key: str = "metrics") -> dict[str, float] | None:
        """The metrics of the evaluation at ``step`` (``key="guard"``: the guard set's), if there was one."""
        return next((dict(h[key]) for h in self.history if h["step"] == step and key in h), None)

    def rankings_at(self, step: int, dataset: QADataset) -> Tensor | None:
        """The per-query rankings of the evaluation at ``step``, if there was one and it ranked ``dataset`` (a
        resumed run may validate on other data: its rankings would name other queries and documents)."""
        entry = self.rankings.get(step)
        return entry["rankings"] if entry is not None and entry["dataset"] == fingerprint(dataset) else None

    def validation_set(self, trainer: L.Trainer) -> QADataset | None:
        """The dataset evaluated: ``dataset``, else the datamodule's ``val_dataset`` (None: no validation)."""
        if self.dataset is not None:
            return self.dataset
        data = trainer_data(trainer)
        return data.val_dataset if data is not None else None

    def evaluate(
        self, trainer: L.Trainer, pl_module: L.LightningModule, step: int | None = None
    ) -> dict[str, float] | None:
        """Scores the module's encoder on the validation set as it is now (None without a validation set).

        ``step``: keep this evaluation's rankings as that step's (the module holds that step's weights).
        """
        dataset = self.validation_set(trainer)
        if dataset is None:
            return None
        metrics, rankings = evaluate_encoder_and_rank(
            pl_module.encoder, dataset, self.batch_size, self.corpus_chunk_size, truncate_dim=self.truncate_dim
        )
        if step is not None:
            self.rankings[step] = {"rankings": rankings, "dataset": fingerprint(dataset)}
        return metrics

    def evaluate_guard(self, pl_module: L.LightningModule) -> dict[str, float] | None:
        """Scores the module's encoder on the guard set as it is now (None without one)."""
        if self.guard is None:
            return None
        return evaluate_encoder(
            pl_module.encoder, self.guard, self.batch_size, self.corpus_chunk_size, truncate_dim=self.truncate_dim
        )

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if self.history and self.history[-1]["step"] == step:
            return
        with full_parameters(trainer):
            metrics = self.evaluate(trainer, pl_module, step)
            guard = self.evaluate_guard(pl_module)
        if metrics is None:
            return
        self.history.append({"step": step, "metrics": metrics, **({"guard": guard} if guard else {})})
        logged = {f"val/{name}": value for name, value in metrics.items()}
        logged |= {f"guard/{name}": value for name, value in (guard or {}).items()}
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in logged.items()})
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=step)
        if trainer.is_global_zero:
            self._log_evaluation(step, metrics)

    def _log_evaluation(self, step: int, metrics: dict[str, float]) -> None:
        log.info("step %d: val/mrr@10 %.4f, val/ndcg@10 %.4f", step, metrics["mrr@10"], metrics["ndcg@10"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.history:  # a resumed run already has its base numbers
            self._evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.evaluation_steps > 0 and step > 0 and step % self.evaluation_steps == 0:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._evaluate(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "rankings": self.rankings}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self.rankings = dict(state_dict.get("rankings", {}))  # checkpoints written before rankings were kept
