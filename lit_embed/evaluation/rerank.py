"""The two-stage pipeline measured as it runs: each query's first-stage top-K, reordered by a reranker.

A relevant document the retriever did not fetch stays missed, so the numbers are what a deployed pipeline scores.
They equal sentence-transformers' ``CrossEncoderRerankingEvaluator`` given each query's top-K as ``documents`` with
``always_rerank_positives=False``: MRR@10, NDCG@10 and MAP over the K candidates, normalised by every relevant
document of the query (also those not fetched), for the first stage's order and for the reranked one. Equal
reranker scores keep the first stage's order.

A fused pipeline orders the candidates by ``w * z(reranker logit) + (1 - w) * z(retriever cosine)``, each stage's
scores standardized over the query's candidates (mean 0, standard deviation 1, so that ``w`` is each stage's share
whatever its scale): ``w = 0`` is the first stage's order, ``w = 1`` the reranker's. A reranker's run chooses ``w`` on
its validation set (:func:`choose_fusion`), and keeps the retriever's order unless a blend beats it there with 95%
confidence, query by query: a weight fitted to a small validation set's luck would lose on the next queries.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lit_embed.data.schema import QADataset
from lit_embed.errors import LitEmbedError
from lit_embed.evaluation.ir import exact_search, retrieval_metrics
from lit_embed.evaluation.retrieval import TextEncoder, embed_for_search
from lit_embed.files import write_text_atomic

# (query, document) pairs -> one relevance score each, higher = more relevant (a CrossEncoder's predict).
PairScorer = Callable[[list[tuple[str, str]]], Sequence[float]]

AT_K = 10
# The fusion weights a run tries on validation: 0 (the retriever's order) to 1 (the reranker's).
FUSION_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# A blend is chosen only where its gain in MRR@10 over the retriever's order, query by query, has a one-sided 95%
# lower confidence bound above 0 (mean - 1.645 standard errors): on 60 validation queries a +0.026 without that
# confidence lost 0.020 on the test queries.
CONFIDENCE_Z = 1.645
# A reranker's run records its fusion weight here, in the exported model's directory (CrossEncoder ignores it).
FUSION_FILE = "fusion.json"


@dataclass(frozen=True)
class Candidates:
    """Each query's first-stage top-K, best first.

    Attributes:
        query_ids: the queries, in the dataset's order.
        documents: ``[Q, K]`` positions in ``corpus_ids``.
        corpus_ids: the corpus ids the positions index.
        relevant: ``[Q, K]`` whether each candidate is relevant to its query.
        num_relevant: ``[Q]`` the query's relevant documents, fetched or not.
        scores: ``[Q, K]`` the retriever's cosine similarity of each candidate to its query.
    """

    query_ids: list[str]
    documents: Tensor
    corpus_ids: list[str]
    relevant: Tensor
    num_relevant: Tensor
    scores: Tensor

    @property
    def top_k(self) -> int:
        return self.documents.size(1)

    def pairs(self, dataset: QADataset) -> list[tuple[str, str]]:
        """Every (query, candidate) pair, query by query, best first: what a reranker scores."""
        return [
            (dataset.queries[query], dataset.corpus[self.corpus_ids[doc]])
            for query, row in zip(self.query_ids, self.documents.tolist(), strict=True)
            for doc in row
        ]


def first_stage(encoder: TextEncoder, dataset: QADataset, top_k: int, batch_size: int = 64) -> Candidates:
    """The retriever's top ``top_k`` of the whole corpus for each query (exact cosine search, as training
    evaluates; equal scores in corpus id order)."""
    query_ids = list(dataset.queries)
    queries, corpus, corpus_ids = embed_for_search(encoder, dataset, query_ids, batch_size)
    scores, hits = exact_search(queries, corpus, min(top_k, len(corpus_ids)))  # [Q, K]
    hits = hits.cpu()
    relevant_sets = [set(dataset.relevant_docs.get(q, ())) for q in query_ids]
    relevant = torch.tensor(
        [[corpus_ids[d] in wanted for d in row] for row, wanted in zip(hits.tolist(), relevant_sets, strict=True)],
        dtype=torch.bool,
    )
    num_relevant = torch.tensor([len(wanted) for wanted in relevant_sets], dtype=torch.float64)
    return Candidates(query_ids, hits, corpus_ids, relevant, num_relevant, scores.cpu().double())


def ranking_metrics(relevant: Tensor, num_relevant: Tensor, at_k: int = AT_K) -> dict[str, float]:
    """``map``, ``mrr@k``, ``ndcg@k`` and ``recall@k`` of ranked candidates, averaged over queries.

    MRR, NDCG and recall are :func:`~lit_embed.evaluation.ir.retrieval_metrics`'. MAP is the reranking evaluator's:
    over all K candidates, the precision at each relevant one, summed and divided by every relevant document.

    Args:
        relevant: bool ``[Q, K]``, each query's candidates in the order ranked.
        num_relevant: ``[Q]`` each query's relevant documents (at least 1), fetched or not.
        at_k: the cut-off of MRR, NDCG and recall.
    """
    ranks = torch.arange(1, relevant.size(1) + 1, dtype=torch.float64)  # [K]
    precision_at_hits = relevant.double() * relevant.double().cumsum(dim=1) / ranks  # [Q, K]
    average_precision = precision_at_hits.sum(dim=1) / num_relevant.double()  # [Q]
    cut = retrieval_metrics(relevant, num_relevant, {"mrr": (at_k,), "ndcg": (at_k,), "recall": (at_k,)})
    return {"map": average_precision.mean().item(), **cut}


def reranked(candidates: Candidates, scores: Tensor) -> Tensor:
    """``[Q, K]`` the candidates' relevance in the order of ``scores`` ``[Q, K]`` (best first; equal scores keep
    the first stage's order)."""
    return candidates.relevant.gather(1, order_of(scores))


def order_of(scores: Tensor) -> Tensor:
    """``[Q, K]`` candidate positions, best first (equal scores keep the first stage's order)."""
    return scores.double().argsort(dim=1, descending=True, stable=True)


def fused(candidates: Candidates, logits: Tensor, weight: float) -> Tensor:
    """``[Q, K]`` the pipeline's scores: ``weight * z(logits) + (1 - weight) * z(the retriever's cosine)``, ``z``
    standardizing each query's candidates' scores."""
    if weight in (0.0, 1.0):  # one stage's own order, ties included
        return candidates.scores if weight == 0.0 else logits.double()
    return weight * standardized(logits.double()) + (1.0 - weight) * standardized(candidates.scores)


def standardized(scores: Tensor) -> Tensor:
    """``[Q, K]`` each row shifted to mean 0 and scaled to standard deviation 1 (a constant row to 0)."""
    centred = scores - scores.mean(dim=1, keepdim=True)
    return centred / centred.std(dim=1, keepdim=True, correction=0).clamp(min=1e-12)


def reranker_scores(candidates: Candidates, dataset: QADataset, scorer: PairScorer) -> Tensor:
    """``[Q, K]`` the reranker's scores of every candidate (one call of ``scorer`` for all the pairs)."""
    scores = torch.as_tensor(scorer(candidates.pairs(dataset)), dtype=torch.float64)
    return scores.view(len(candidates.query_ids), candidates.top_k)


def choose_fusion(
    candidates: Candidates, logits: Tensor, at_k: int = AT_K, z: float = CONFIDENCE_Z
) -> tuple[float, dict[str, dict[str, float]]]:
    """The fusion weight of :data:`FUSION_WEIGHTS` with the best MRR@``at_k`` on these candidates among those whose
    per-query gain over the retriever's order (``w = 0``) has a lower confidence bound (mean - ``z`` standard errors)
    above 0; 0 when none has. Also every weight's metrics, with that bound as ``gain_lower_bound``."""
    first = reciprocal_ranks(candidates.relevant, at_k)
    by_weight = {}
    for weight in FUSION_WEIGHTS:
        relevant = reranked(candidates, fused(candidates, logits, weight))
        gains = reciprocal_ranks(relevant, at_k) - first
        spread = gains.std().item() / math.sqrt(len(gains)) if len(gains) > 1 else math.inf
        metrics = ranking_metrics(relevant, candidates.num_relevant, at_k)
        by_weight[str(weight)] = {**metrics, "gain_lower_bound": gains.mean().item() - z * spread}
    confident = [weight for weight in FUSION_WEIGHTS if weight > 0 and by_weight[str(weight)]["gain_lower_bound"] > 0]
    metric = f"mrr@{at_k}"
    best = max(confident, key=lambda weight: (by_weight[str(weight)][metric], -weight), default=0.0)
    return best, by_weight


def reciprocal_ranks(relevant: Tensor, at_k: int = AT_K) -> Tensor:
    """``[Q]`` each query's 1 / rank of its first relevant candidate within ``at_k`` (0: none there)."""
    hits = relevant[:, :at_k]
    first = hits.int().argmax(dim=1) + 1
    return torch.where(hits.any(dim=1), 1.0 / first.double(), torch.zeros(len(hits), dtype=torch.float64))


def brief_rankings(candidates: Candidates, scores: Tensor, dataset: QADataset) -> Tensor:
    """``[Q, 2]`` int32, as the embedding job's evaluation keeps them for the run's report: each query's top
    candidate (its position in ``dataset.corpus``) and the rank (from 1) of its first relevant candidate in the
    order of ``scores`` (0: none fetched)."""
    order = order_of(scores)
    position = {doc_id: i for i, doc_id in enumerate(dataset.corpus)}
    top = candidates.documents.gather(1, order[:, :1])[:, 0]
    top = torch.tensor([position[candidates.corpus_ids[d]] for d in top.tolist()], dtype=torch.int32)
    relevant = candidates.relevant.gather(1, order)
    first = torch.where(relevant.any(dim=1), relevant.int().argmax(dim=1) + 1, 0).to(torch.int32)
    return torch.stack([top, first], dim=1)


def evaluate_pipeline(
    candidates: Candidates,
    dataset: QADataset,
    scorer: PairScorer,
    at_k: int = AT_K,
    fusion_weight: float | None = None,
) -> dict[str, dict[str, float]]:
    """``{"retriever": metrics, "reranked": metrics}``: the first stage's order, and its candidates reordered by
    ``scorer``'s scores (see :func:`ranking_metrics`); with a ``fusion_weight`` also ``"pipeline"``, the order of
    the fused scores."""
    scores = reranker_scores(candidates, dataset, scorer)
    stages = {
        "retriever": ranking_metrics(candidates.relevant, candidates.num_relevant, at_k),
        "reranked": ranking_metrics(reranked(candidates, scores), candidates.num_relevant, at_k),
    }
    if fusion_weight is not None:
        pipeline = reranked(candidates, fused(candidates, scores, fusion_weight))
        stages["pipeline"] = {**ranking_metrics(pipeline, candidates.num_relevant, at_k), "weight": fusion_weight}
    return stages


def write_fusion(model_dir: str | os.PathLike, fusion: Mapping[str, Any]) -> None:
    """Records a run's fusion weight (and what chose it) in its exported reranker's directory."""
    write_text_atomic(Path(model_dir) / FUSION_FILE, json.dumps(dict(fusion), indent=2) + "\n")


def read_fusion(model_dir: str | os.PathLike) -> float | None:
    """The fusion weight a reranker's run recorded in ``model_dir`` (None: none recorded)."""
    path = Path(model_dir) / FUSION_FILE
    if not path.is_file():
        return None
    try:
        weight = json.loads(path.read_text(encoding="utf-8"))["weight"]
    except (ValueError, KeyError, TypeError) as err:
        raise LitEmbedError(
            f'{path} is not a fusion record ({type(err).__name__}): it should hold {{"weight": w}} with 0 <= w <= 1. '
            "Delete it to rerank with the reranker's order alone, or export the run again."
        ) from None
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
        raise LitEmbedError(f"{path}: its weight {weight!r} is not a number from 0 to 1. Delete the file or fix it.")
    return float(weight)
