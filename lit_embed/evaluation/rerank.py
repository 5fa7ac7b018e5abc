"""The two-stage pipeline measured as it runs: each query's first-stage top-K, reordered by a reranker.

A relevant document the retriever did not fetch stays missed, so the numbers are what a deployed pipeline scores.
They equal sentence-transformers' ``CrossEncoderRerankingEvaluator`` given each query's top-K as ``documents`` with
``always_rerank_positives=False``: MRR@10, NDCG@10 and MAP over the K candidates, normalised by every relevant
document of the query (also those not fetched), for the first stage's order and for the reranked one. Equal
reranker scores keep the first stage's order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lit_embed.data.schema import QADataset
from lit_embed.evaluation.ir import exact_search, retrieval_metrics
from lit_embed.evaluation.retrieval import TextEncoder, embed_for_search

# (query, document) pairs -> one relevance score each, higher = more relevant (a CrossEncoder's predict).
PairScorer = Callable[[list[tuple[str, str]]], Sequence[float]]

AT_K = 10


@dataclass(frozen=True)
class Candidates:
    """Each query's first-stage top-K, best first.

    Attributes:
        query_ids: the queries, in the dataset's order.
        documents: ``[Q, K]`` positions in ``corpus_ids``.
        corpus_ids: the corpus ids the positions index.
        relevant: ``[Q, K]`` whether each candidate is relevant to its query.
        num_relevant: ``[Q]`` the query's relevant documents, fetched or not.
    """

    query_ids: list[str]
    documents: Tensor
    corpus_ids: list[str]
    relevant: Tensor
    num_relevant: Tensor

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
    _, hits = exact_search(queries, corpus, min(top_k, len(corpus_ids)))  # [Q, K]
    hits = hits.cpu()
    relevant_sets = [set(dataset.relevant_docs.get(q, ())) for q in query_ids]
    relevant = torch.tensor(
        [[corpus_ids[d] in wanted for d in row] for row, wanted in zip(hits.tolist(), relevant_sets, strict=True)],
        dtype=torch.bool,
    )
    num_relevant = torch.tensor([len(wanted) for wanted in relevant_sets], dtype=torch.float64)
    return Candidates(query_ids, hits, corpus_ids, relevant, num_relevant)


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
    order = scores.double().argsort(dim=1, descending=True, stable=True)
    return candidates.relevant.gather(1, order)


def evaluate_pipeline(
    candidates: Candidates, dataset: QADataset, scorer: PairScorer, at_k: int = AT_K
) -> dict[str, dict[str, float]]:
    """``{"retriever": metrics, "reranked": metrics}``: the first stage's order, and its candidates reordered by
    ``scorer``'s scores (see :func:`ranking_metrics`)."""
    scores = torch.as_tensor(scorer(candidates.pairs(dataset)), dtype=torch.float64)
    scores = scores.view(len(candidates.query_ids), candidates.top_k)
    return {
        "retriever": ranking_metrics(candidates.relevant, candidates.num_relevant, at_k),
        "reranked": ranking_metrics(reranked(candidates, scores), candidates.num_relevant, at_k),
    }
