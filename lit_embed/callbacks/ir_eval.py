"""Retrieval evaluation of the encoder before, during and after training (metrics from ``lit_embed.evaluation.ir``)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor

from lit_embed.data.formats import QADataset
from lit_embed.distributed import all_gather_rows, full_parameters, rank_and_world
from lit_embed.errors import LitEmbedError
from lit_embed.evaluation.ir import DEFAULT_K, evaluate_embeddings
from lit_embed.models.encoder import Encoder, TextKind

log = logging.getLogger(__name__)

# The rows of the before/after table printed at the end of a run.
METRIC_TABLE_KEYS = ("mrr@10", "ndcg@10", "map@100", "recall@10", "accuracy@1", "accuracy@5", "accuracy@10")


def _encode(
    encoder: Encoder, texts: list[str], kind: TextKind, batch_size: int, truncate_dim: int | None = None
) -> Tensor:
    # bf16 on the GPU halves the evaluation time; the scores are computed in float32 anyway.
    use_bf16 = encoder.device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    with autocast:
        embeddings = encoder.encode(texts, kind, batch_size)  # [n, D]
    # Cut before scoring, which normalizes, as sentence-transformers' truncate_dim does; None keeps all D.
    return embeddings[:, :truncate_dim]  # [n, truncate_dim]


def _encode_sharded(
    encoder: Encoder, texts: list[str], kind: TextKind, batch_size: int, truncate_dim: int | None = None
) -> Tensor:
    """Each rank embeds its contiguous share of the texts; the shares are gathered back in the input order."""
    rank, world = rank_and_world()
    share = texts[rank * len(texts) // world : (rank + 1) * len(texts) // world]
    return all_gather_rows(_encode(encoder, share, kind, batch_size, truncate_dim))[0]  # [len(texts), D]


def evaluate_encoder(
    encoder: Encoder,
    dataset: QADataset,
    batch_size: int = 64,
    corpus_chunk_size: int = 50_000,
    truncate_dim: int | None = None,
) -> dict[str, float]:
    """Embeds the validation queries and corpus with the encoder's prompts and scores exact cosine search.

    Under ``torch.distributed`` each rank embeds its shard of the corpus and of the queries once, searches
    only its own queries against the gathered corpus, and the per-rank means are combined: every rank returns
    the same metrics and no rank repeats the whole evaluation.

    ``truncate_dim`` scores only the first that many dimensions of every embedding (a smaller size of a model
    trained with ``loss=matryoshka``), as sentence-transformers' ``truncate_dim`` does; None scores them all.
    """
    check_truncate_dim(truncate_dim, encoder.embedding_dim)
    rank, world = rank_and_world()
    query_ids = list(dataset.queries)[rank::world]
    corpus_ids = list(dataset.corpus)
    corpus = _encode_sharded(encoder, [dataset.corpus[d] for d in corpus_ids], "document", batch_size, truncate_dim)
    queries = _encode(encoder, [dataset.queries[q] for q in query_ids], "query", batch_size, truncate_dim)
    metrics = evaluate_embeddings(
        queries, corpus, query_ids, corpus_ids, dataset.relevant_docs, DEFAULT_K, corpus_chunk_size=corpus_chunk_size
    )
    if world == 1:
        return metrics
    # Every query has a relevant document (validated), so each rank's mean is over len(query_ids) queries.
    sums = torch.tensor([v * len(query_ids) for v in metrics.values()] + [len(query_ids)], dtype=torch.float64)
    sums = sums.to(corpus.device)
    dist.all_reduce(sums)
    return {key: (sums[i] / sums[-1]).item() for i, key in enumerate(metrics)}


def check_truncate_dim(truncate_dim: int | None, embedding_dim: int) -> None:
    """Raises a ``LitEmbedError`` unless ``truncate_dim`` is None or between 1 and ``embedding_dim``."""
    if truncate_dim is not None and not 1 <= truncate_dim <= embedding_dim:
        raise LitEmbedError(
            f"truncate_dim={truncate_dim} is not a size of this model's {embedding_dim}-dimensional embeddings: set "
            f"eval.truncate_dim (lit-embed-eval --truncate-dim) between 1 and {embedding_dim}, or to null to score "
            "the full embeddings."
        )


class IREvaluationCallback(L.Callback):
    """Evaluates retrieval on the validation set at step 0, every ``evaluation_steps`` optimizer steps and at the end.

    Metrics are logged as ``val/<name>`` (``val/mrr@10``, ``val/ndcg@10`` ...) to every logger and put in
    ``trainer.callback_metrics`` so checkpointing can monitor them. ``history`` keeps every evaluation and is
    saved in checkpoints, so a resumed run still reports the base model's numbers.

    Args:
        evaluation_steps: evaluate every this many optimizer steps (0 = only before and after training).
        batch_size: texts per encoder call.
        corpus_chunk_size: corpus rows scored at once (bounds memory for huge corpora).
        dataset: the validation set; None takes ``trainer.datamodule.val_dataset``.
        truncate_dim: score only the first this many embedding dimensions, e.g. a smaller size trained with
            ``loss=matryoshka`` (None = all). The logged metrics, and the checkpoint they select, are that size's.
    """

    def __init__(
        self,
        evaluation_steps: int = 50,
        batch_size: int = 64,
        corpus_chunk_size: int = 50_000,
        dataset: QADataset | None = None,
        truncate_dim: int | None = None,
    ) -> None:
        if truncate_dim is not None and truncate_dim < 1:
            raise LitEmbedError(f"eval.truncate_dim must be a positive embedding size or null, got {truncate_dim}.")
        self.evaluation_steps = evaluation_steps
        self.batch_size = batch_size
        self.corpus_chunk_size = corpus_chunk_size
        self.dataset = dataset
        self.truncate_dim = truncate_dim
        self.history: list[dict[str, Any]] = []

    def metrics_at(self, step: int) -> dict[str, float] | None:
        """The metrics of the evaluation at ``step``, if there was one."""
        return next((dict(h["metrics"]) for h in self.history if h["step"] == step), None)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float] | None:
        """Scores the module's encoder on the validation set as it is now (None without a validation set)."""
        dataset = self.dataset if self.dataset is not None else getattr(trainer.datamodule, "val_dataset", None)
        if dataset is None:
            return None
        return evaluate_encoder(
            pl_module.encoder, dataset, self.batch_size, self.corpus_chunk_size, truncate_dim=self.truncate_dim
        )

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if self.history and self.history[-1]["step"] == step:
            return
        with full_parameters(trainer):
            metrics = self.evaluate(trainer, pl_module)
        if metrics is None:
            return
        self.history.append({"step": step, "metrics": metrics})
        logged = {f"val/{name}": value for name, value in metrics.items()}
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in logged.items()})
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=step)
        if trainer.is_global_zero:
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
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
