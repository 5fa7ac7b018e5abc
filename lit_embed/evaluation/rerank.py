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
from lit_embed.evaluation.ir import exact_search
from lit_embed.evaluation.retrieval import TextEncoder, encode_corpus, encode_texts

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
    corpus_ids = sorted(dataset.corpus)
    documents = (dataset.corpus[d] for d in corpus_ids)
    corpus = encode_corpus(encoder, documents, len(corpus_ids), "document", batch_size)
    query_ids = list(dataset.queries)
    queries = encode_texts(encoder, [dataset.queries[q] for q in query_ids], "query", batch_size)
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

    Args:
        relevant: bool ``[Q, K]``, each query's candidates in the order ranked.
        num_relevant: ``[Q]`` each query's relevant documents, fetched or not (a query without any scores 0).
        at_k: the cut-off of MRR, NDCG and recall.
    """
    relevant = relevant.double()  # [Q, K]
    ranks = torch.arange(1, relevant.size(1) + 1, dtype=torch.float64)  # [K]
    hits = relevant.cumsum(dim=1)  # [Q, K] relevant candidates up to each rank
    wanted = torch.maximum(num_relevant.double(), hits[:, -1]).clamp(min=1)  # [Q]
    top = relevant[:, :at_k]  # [Q, k]
    discounts = 1.0 / torch.log2(ranks[: top.size(1)] + 1)  # [k]
    ideal = torch.cumsum(1.0 / torch.log2(torch.arange(2, at_k + 2, dtype=torch.float64)), dim=0)  # [at_k]
    first = top * (top.cumsum(dim=1) == 1)  # [Q, k] one-hot at the first relevant rank
    per_query = {
        "map": (relevant * hits / ranks).sum(dim=1) / wanted,
        f"mrr@{at_k}": (first / ranks[: top.size(1)]).sum(dim=1),
        f"ndcg@{at_k}": (top * discounts).sum(dim=1) / ideal[wanted.clamp(max=at_k).long() - 1],
        f"recall@{at_k}": top.sum(dim=1) / wanted,
    }
    return {name: values.mean().item() for name, values in per_query.items()}


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
