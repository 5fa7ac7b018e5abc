"""Exact dense retrieval and IR metrics, matching sentence-transformers' ``InformationRetrievalEvaluator``.

This is the one place retrieval metrics are computed. The definitions reproduce
``InformationRetrievalEvaluator.compute_metrics`` (binary relevance, means over queries), including its
``(-score, corpus_id)`` ranking order, so numbers are comparable with published sentence-transformers runs.

Ties are *exact* ties (bitwise-equal float32 scores). Note that a float32 matmul can score two identical
documents one ulp apart depending on where they sit in a chunk (BLAS blocking), in which case they are not
tied; sentence-transformers behaves the same way.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_embed.evaluation import DEFAULT_K

_SIMILARITIES = ("cosine", "dot")


def _top_k_stable(scores: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Best ``k`` columns per row, best first; equal scores stay in column order.

    ``topk`` is fast but breaks ties arbitrarily: its picks are put back in column order and stable-sorted by
    score, and only rows where a tie straddles the cut-off (so the pick itself is ambiguous) get a full stable
    sort. That keeps the exact order of a full sort at the cost of a top-k.
    """
    k = min(k, scores.size(1))
    picked = scores.topk(k, dim=1).indices.sort(dim=1).values  # [Q, k] column order
    order = picked.gather(1, scores.gather(1, picked).sort(dim=1, descending=True, stable=True).indices)
    kth = scores.gather(1, order[:, -1:])  # [Q, 1] the score at the cut-off
    straddling = ((scores >= kth).sum(dim=1) > k).nonzero().squeeze(1)
    if straddling.numel():
        full = torch.sort(scores[straddling], dim=1, descending=True, stable=True).indices[:, :k]
        order[straddling] = full
    return scores.gather(1, order), indices.gather(1, order)


def exact_search(
    query_embeddings: Tensor,
    corpus_embeddings: Tensor,
    top_k: int,
    corpus_chunk_size: int = 50_000,
    similarity: str = "cosine",
) -> tuple[Tensor, Tensor]:
    """Brute-force top-k search, scoring the corpus one chunk at a time.

    Scores are float32 on the queries' device; each corpus chunk is moved there, so a corpus kept on the CPU
    can be searched with GPU queries. Peak memory is about ``Q x corpus_chunk_size`` scores plus their sort,
    never ``Q x C``.

    Args:
        query_embeddings: ``[Q, D]``.
        corpus_embeddings: ``[C, D]``.
        top_k: hits to return per query; clamped to ``C``.
        corpus_chunk_size: corpus rows scored at once.
        similarity: ``"cosine"`` (both sides L2-normalised) or ``"dot"``.

    Returns:
        ``(scores, indices)``, both ``[Q, min(top_k, C)]``, best first; equal scores are ordered by the lower
        corpus index.
    """
    if similarity not in _SIMILARITIES:
        raise ValueError(f"similarity must be one of {_SIMILARITIES}, got {similarity!r}")
    if top_k < 1 or corpus_chunk_size < 1:
        raise ValueError(f"top_k and corpus_chunk_size must be positive, got {top_k} and {corpus_chunk_size}")
    if query_embeddings.dim() != 2 or corpus_embeddings.dim() != 2:
        raise ValueError("query_embeddings and corpus_embeddings must be 2-D [N, D]")
    if query_embeddings.size(1) != corpus_embeddings.size(1):
        raise ValueError(
            f"embedding sizes differ: queries {query_embeddings.size(1)}, corpus {corpus_embeddings.size(1)}"
        )
    device = query_embeddings.device
    queries = query_embeddings.float()
    if similarity == "cosine":
        queries = F.normalize(queries, dim=-1)

    num_queries, corpus_size = queries.size(0), corpus_embeddings.size(0)
    k = min(top_k, corpus_size)
    best_scores = queries.new_empty(num_queries, 0)  # [Q, k'] running top-k, k' grows to k
    best_indices = torch.empty(num_queries, 0, dtype=torch.long, device=device)
    for start in range(0, corpus_size, corpus_chunk_size):
        chunk = corpus_embeddings[start : start + corpus_chunk_size].to(device=device, dtype=torch.float32)
        if similarity == "cosine":
            chunk = F.normalize(chunk, dim=-1)
        scores = queries @ chunk.T  # [Q, chunk]
        indices = torch.arange(start, start + chunk.size(0), device=device).expand(num_queries, -1)
        scores, indices = _top_k_stable(scores, indices, k)  # [Q, min(k, chunk)]
        # The running hits come first and have lower indices, so the stable merge keeps index order on ties.
        best_scores, best_indices = _top_k_stable(
            torch.cat([best_scores, scores], dim=1), torch.cat([best_indices, indices], dim=1), k
        )
    return best_scores, best_indices


def retrieval_metrics(
    ranked_relevance: Tensor,
    num_relevant: Tensor,
    k_values: Mapping[str, Sequence[int]] = DEFAULT_K,
) -> dict[str, float]:
    """IR metrics from ranked binary relevance, averaged over queries.

    Definitions follow sentence-transformers: accuracy@k (any relevant hit in the top k), precision@k
    (hits / k, also when fewer than k documents exist), recall@k (hits / num_relevant), MRR@k, NDCG@k
    (binary gains, ``log2(rank + 1)`` discounts, ideal DCG over ``min(num_relevant, k)`` hits) and MAP@k
    (precision at each relevant hit, summed and divided by ``min(k, num_relevant)``).

    Args:
        ranked_relevance: bool ``[Q, n]``; ``[q, i]`` says whether query ``q``'s hit at rank ``i + 1`` is
            relevant. Ranks past ``n`` count as non-relevant, so ``k > n`` (e.g. a small corpus) is allowed.
        num_relevant: ``[Q]`` relevant documents per query (at least 1), including any the ranking missed.
        k_values: cut-offs per metric; metric names are ``accuracy``, ``precision``, ``recall``, ``mrr``,
            ``ndcg`` and ``map``.

    Returns:
        ``{"<metric>@<k>": mean over queries}`` in ``k_values`` order.
    """
    unknown = set(k_values) - {"accuracy", "precision", "recall", "mrr", "ndcg", "map"}
    if unknown:
        raise ValueError(f"unknown metrics in k_values: {sorted(unknown)}")
    all_k = [k for ks in k_values.values() for k in ks]
    if not all_k or min(all_k) < 1:
        raise ValueError(f"k_values needs positive cut-offs, got {dict(k_values)}")
    if ranked_relevance.dim() != 2 or num_relevant.shape != ranked_relevance.shape[:1]:
        raise ValueError(
            f"expected ranked_relevance [Q, n] and num_relevant [Q], got {tuple(ranked_relevance.shape)} "
            f"and {tuple(num_relevant.shape)}"
        )
    if ranked_relevance.size(0) == 0:
        raise ValueError("no queries to evaluate")
    if (num_relevant < 1).any():
        raise ValueError("every query needs at least one relevant document (recall and NDCG divide by it)")

    # [Q, max_k] is small; float64 on the CPU matches sentence-transformers' Python-float arithmetic and
    # works on devices without float64.
    max_k = max(all_k)
    relevant = ranked_relevance.detach().cpu().bool()[:, :max_k]
    relevant = F.pad(relevant, (0, max_k - relevant.size(1))).double()  # [Q, max_k]
    num_relevant = num_relevant.detach().cpu().double()  # [Q]
    ranks = torch.arange(1, max_k + 1, dtype=torch.float64)  # [max_k]
    hits = relevant.cumsum(dim=1)  # [Q, max_k] relevant hits up to each rank
    first_hit = relevant * (hits == 1)  # [Q, max_k] one-hot at the first relevant rank
    discounts = 1.0 / torch.log2(ranks + 1)
    ideal_dcg = discounts.cumsum(dim=0)  # [max_k] DCG of n relevant hits at ranks 1..n

    def at_k(name: str, k: int) -> Tensor:
        """Per-query metric ``[Q]``."""
        if name == "accuracy":
            return (hits[:, k - 1] > 0).double()
        if name == "precision":
            return hits[:, k - 1] / k
        if name == "recall":
            return hits[:, k - 1] / num_relevant
        if name == "mrr":
            return (first_hit[:, :k] / ranks[:k]).sum(dim=1)
        if name == "ndcg":
            dcg = (relevant[:, :k] * discounts[:k]).sum(dim=1)
            return dcg / ideal_dcg[num_relevant.clamp(max=k).long() - 1]
        # name == "map": precision at each relevant rank
        precision_at_hits = relevant[:, :k] * hits[:, :k] / ranks[:k]
        return precision_at_hits.sum(dim=1) / num_relevant.clamp(max=k)

    return {f"{name}@{k}": at_k(name, k).mean().item() for name, ks in k_values.items() for k in ks}


def evaluate_embeddings(
    query_embeddings: Tensor,
    corpus_embeddings: Tensor,
    query_ids: Sequence[str],
    corpus_ids: Sequence[str],
    relevant_docs: Mapping[str, Collection[str]],
    k_values: Mapping[str, Sequence[int]] = DEFAULT_K,
    corpus_chunk_size: int = 50_000,
    similarity: str = "cosine",
) -> dict[str, float]:
    """Exact search plus metrics, giving the numbers ``InformationRetrievalEvaluator`` reports.

    The same as :func:`evaluate_and_rank` without the per-query rankings.
    """
    return evaluate_and_rank(
        query_embeddings,
        corpus_embeddings,
        query_ids,
        corpus_ids,
        relevant_docs,
        k_values,
        corpus_chunk_size,
        similarity,
    )[0]


def evaluate_and_rank(
    query_embeddings: Tensor,
    corpus_embeddings: Tensor,
    query_ids: Sequence[str],
    corpus_ids: Sequence[str],
    relevant_docs: Mapping[str, Collection[str]],
    k_values: Mapping[str, Sequence[int]] = DEFAULT_K,
    corpus_chunk_size: int = 50_000,
    similarity: str = "cosine",
) -> tuple[dict[str, float], Tensor]:
    """Exact search plus metrics, giving the numbers ``InformationRetrievalEvaluator`` reports, and each query's
    ranking in brief: its top hit and where its first relevant document came.

    Like sentence-transformers, queries without relevant documents are skipped, and relevant ids missing
    from the corpus still count towards recall, NDCG and MAP denominators. Relevant ids are de-duplicated.

    Args:
        query_embeddings: ``[Q, D]``, row ``i`` for ``query_ids[i]``.
        corpus_embeddings: ``[C, D]``, row ``j`` for ``corpus_ids[j]`` (unique).
        query_ids: ids of the query rows.
        corpus_ids: ids of the corpus rows.
        relevant_docs: query id -> relevant corpus ids.
        k_values: cut-offs per metric, see :func:`retrieval_metrics`.
        corpus_chunk_size: corpus rows scored at once, see :func:`exact_search`.
        similarity: ``"cosine"`` or ``"dot"``.

    Returns:
        ``{"<metric>@<k>": value}``, e.g. ``"ndcg@10"``; and ``[Q, 2]`` int32 rankings, row ``i`` for
        ``query_ids[i]``: the position in ``corpus_ids`` of its top hit, and the rank (from 1) of its first relevant
        hit within the largest cut-off of ``k_values`` (0: none there). A query without relevant documents gets
        ``[-1, 0]``. Two numbers per query, so every evaluation of a run can keep them (the run's report).
    """
    if len(query_ids) != query_embeddings.size(0) or len(corpus_ids) != corpus_embeddings.size(0):
        raise ValueError(
            f"{len(query_ids)} query ids for {query_embeddings.size(0)} query rows, "
            f"{len(corpus_ids)} corpus ids for {corpus_embeddings.size(0)} corpus rows"
        )
    if len(set(corpus_ids)) != len(corpus_ids):
        raise ValueError("corpus_ids must be unique")
    kept = [i for i, qid in enumerate(query_ids) if relevant_docs.get(qid)]
    if not kept:
        raise ValueError("no query has a relevant document")
    relevant_sets = [set(relevant_docs[query_ids[i]]) for i in kept]

    # Index-order tie-breaking in exact_search equals the (-score, corpus_id) order of sentence-transformers
    # once the corpus is in id order; skip the copy (the corpus may be large) when it already is.
    order = sorted(range(len(corpus_ids)), key=corpus_ids.__getitem__)
    sorted_ids = [corpus_ids[j] for j in order]
    if order != list(range(len(order))):
        corpus_embeddings = corpus_embeddings[torch.tensor(order, device=corpus_embeddings.device)]
    queries = query_embeddings[torch.tensor(kept, device=query_embeddings.device)]  # [Q', D]

    top_k = max((k for ks in k_values.values() for k in ks), default=0)  # 0: exact_search rejects it
    _, indices = exact_search(queries, corpus_embeddings, top_k, corpus_chunk_size, similarity)  # [Q', k]

    # Relevance lookup as one isin over (query row, corpus position) keys instead of a Python loop over hits.
    position = {cid: j for j, cid in enumerate(sorted_ids)}
    corpus_size = len(sorted_ids)
    relevant_keys = torch.tensor(
        [
            row * corpus_size + position[cid]
            for row, docs in enumerate(relevant_sets)
            for cid in docs
            if cid in position
        ],
        dtype=torch.long,
        device=indices.device,
    )
    hit_keys = torch.arange(len(kept), device=indices.device).unsqueeze(1) * corpus_size + indices  # [Q', k]
    ranked_relevance = torch.isin(hit_keys, relevant_keys)  # [Q', k]
    num_relevant = torch.tensor([len(docs) for docs in relevant_sets])
    metrics = retrieval_metrics(ranked_relevance, num_relevant, k_values)

    first_relevant = torch.where(
        ranked_relevance.any(dim=1), ranked_relevance.int().argmax(dim=1) + 1, 0
    )  # [Q'] argmax: the first True
    rankings = torch.tensor([[-1, 0]], dtype=torch.int32).repeat(len(query_ids), 1)  # [Q, 2]
    kept_rows = torch.tensor(kept)
    rankings[kept_rows, 0] = torch.tensor(order)[indices[:, 0].cpu()].int()  # sorted position -> input position
    rankings[kept_rows, 1] = first_relevant.cpu().int()
    return metrics, rankings
