"""MultipleNegativesRankingLoss (InfoNCE) with in-batch and optional hard negatives."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lit_embed.batch import PairBatch
from lit_embed.distributed import all_gather_rows, gather_sizes, rank_and_world
from lit_embed.errors import LitEmbedError, check, is_bool, is_int, is_number
from lit_embed.losses.base import EmbeddingLoss

# The interaction terms of sentence-transformers' MultipleNegativesRankingLoss (v6), scored the same way.
DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
PARTITION_MODES = ("joint", "per_direction")
# Directions whose candidates never hold the positive: a softmax of their own would have no target.
_SAME_SIDE = ("query_to_query", "doc_to_doc")


def mnrl(
    queries: Tensor,
    documents: Tensor,
    scale: float = 20.0,
    first_positive: int = 0,
    query_chunk_size: int | None = None,
    directions: Sequence[str] = ("query_to_doc",),
    partition_mode: str = "joint",
    all_queries: Tensor | None = None,
    first_query: int = 0,
    document_rows: Tensor | None = None,
    positives: Tensor | None = None,
) -> Tensor:
    """Cross-entropy of each query against every document in the batch, its own positive being the target.

    Args:
        queries: ``[B, D]`` query embeddings.
        documents: ``[B + N, D]``: row ``i < B`` is query ``i``'s positive; the ``N`` rows after them are hard
            negatives. Every document is a candidate for every query (in-batch negatives), so the hard
            negatives of one query are also negatives for all others, exactly as in sentence-transformers.
        scale: inverse temperature applied to the cosine similarities (20 = temperature 0.05).
        first_positive: row of ``documents`` that holds query 0's positive (query ``i``'s is that row + ``i``);
            non-zero when ``documents`` are gathered from several devices.
        query_chunk_size: score at most this many queries at once, and again in the backward pass, so only a
            ``[query_chunk_size, B + N]`` block of scores is ever in memory (None: all ``B`` at once). The
            ``[B, B + N]`` scores of a 65,536-pair batch alone would take 17 GB in fp32.
        directions: the interaction terms, as sentence-transformers' ``directions``: ``query_to_doc`` (always
            included: it holds the positive), ``query_to_query`` (query ``i`` against every other query),
            ``doc_to_query`` (positive ``i`` against every query) and ``doc_to_doc`` (positive ``i`` against every
            document not given with query ``i``).
        partition_mode: ``joint`` = one softmax over every direction's scores; ``per_direction`` = the mean of
            one log-normaliser per direction (only with ``query_to_doc`` and ``doc_to_query``).
        all_queries: ``[Q, D]`` every query of the batch (all devices' when gathered) for the query-side
            directions; None = ``queries``.
        first_query: row of ``all_queries`` that holds ``queries[0]``.
        document_rows: ``[B + N]`` the row of ``all_queries`` each document was given with (a positive or a hard
            negative; -1 = none). ``doc_to_doc`` leaves those of the same query out, and multi-positive rows find
            their positives by it. None: document ``first_positive + i`` is query ``i``'s, the rest nobody's.
        positives: ``[B + N]`` bool, which documents are positives of their ``document_rows`` query: several per
            query trains each against the non-positives (see :func:`_summed_multi_positive`). None: one positive
            per query, document ``first_positive + i``.

    Returns:
        The mean loss over the ``B`` queries.
    """
    if documents.size(0) < first_positive + queries.size(0):
        raise ValueError(
            f"need at least one positive per query: {queries.size(0)} queries, {documents.size(0)} documents"
        )
    directions = tuple(directions)
    check_directions(directions, partition_mode, multi_positive=positives is not None)
    queries, documents = F.normalize(queries, dim=-1), F.normalize(documents, dim=-1)
    size = queries.size(0)
    rows = torch.arange(size, device=queries.device)
    if directions == ("query_to_doc",) and positives is None:
        # The classic loss, kept on its own path so the default's numbers never change.
        score = _summed_cross_entropy
        args: tuple = (documents, scale)
        per_query = (rows + first_positive,)  # query i's positive
    else:
        all_queries = queries if all_queries is None else F.normalize(all_queries, dim=-1)  # [Q, D]
        if document_rows is None:
            document_rows = torch.full((documents.size(0),), -1, dtype=torch.long, device=documents.device)
            document_rows[first_positive : first_positive + size] = rows + first_query
        score = _summed_multi_positive if positives is not None else _summed_directions
        args = (documents, all_queries, document_rows, positives, directions, partition_mode, scale)
        per_query = (rows + first_query, rows + first_positive)  # query i's row in all_queries, its positive
    if query_chunk_size is None or size <= query_chunk_size:
        return score(queries, *per_query, *args) / size
    total = sum(
        checkpoint(
            score,
            queries[start : start + query_chunk_size],
            *(index[start : start + query_chunk_size] for index in per_query),
            *args,
            use_reentrant=False,
        )
        for start in range(0, size, query_chunk_size)
    )
    return total / size


def check_directions(directions: Sequence[str], partition_mode: str, multi_positive: bool = False) -> None:
    """Refuses directions, partition modes and combinations the loss cannot score, naming the config key."""
    check(
        not isinstance(directions, str)
        and len(directions) > 0
        and all(d in DIRECTIONS for d in directions)
        and "query_to_doc" in directions
        and len(set(directions)) == len(directions),
        "directions",
        list(directions) if not isinstance(directions, str) else directions,
        f"a list of distinct directions from {list(DIRECTIONS)} that includes query_to_doc (it holds the positive)",
    )
    check(partition_mode in PARTITION_MODES, "partition_mode", partition_mode, " or ".join(PARTITION_MODES))
    check(
        partition_mode == "joint" or not set(directions) & set(_SAME_SIDE),
        "partition_mode",
        partition_mode,
        f"joint with the directions {list(directions)}: query_to_query and doc_to_doc never hold the positive, so "
        "a softmax of their own has no target",
    )
    if multi_positive and tuple(directions) != ("query_to_doc",):
        raise LitEmbedError(
            f"loss.directions={list(directions)} cannot score rows with several positives (data.multi_positive=true): "
            "the other directions start from one positive per query. Use loss.directions=[query_to_doc] with them."
        )


def _summed_cross_entropy(queries: Tensor, labels: Tensor, documents: Tensor, scale: float) -> Tensor:
    scores = queries @ documents.T * scale  # [b, B + N]
    # bf16/fp16 logits lose too much precision in the softmax; compute it in at least fp32.
    return F.cross_entropy(_at_least_fp32(scores), labels, reduction="sum")


def _summed_directions(
    queries: Tensor,
    query_rows: Tensor,
    labels: Tensor,
    documents: Tensor,
    all_queries: Tensor,
    document_rows: Tensor,
    positives: Tensor | None,
    directions: tuple[str, ...],
    partition_mode: str,
    scale: float,
) -> Tensor:
    """Sum over queries of ``log Z - s(q_i, d_i)``, ``Z`` over the chosen directions (sentence-transformers')."""
    rows = torch.arange(queries.size(0), device=queries.device)
    own_documents = documents[labels]  # [b, D]: each query's positive
    scores = {"query_to_doc": queries @ documents.T}  # [b, B + N]
    if "query_to_query" in directions:
        scores["query_to_query"] = (queries @ all_queries.T).index_put((rows, query_rows), _minus_inf(queries))
    if "doc_to_query" in directions:
        scores["doc_to_query"] = own_documents @ all_queries.T  # [b, Q]
    if "doc_to_doc" in directions:
        same_query = document_rows[None, :] == query_rows[:, None]  # [b, B + N]: its positive and hard negatives
        scores["doc_to_doc"] = (own_documents @ documents.T).masked_fill(same_query, float("-inf"))  # [b, B + N]
    scores = {key: _at_least_fp32(value * scale) for key, value in scores.items()}
    positive = scores["query_to_doc"][rows, labels]  # [b]
    if partition_mode == "joint":
        log_z = torch.logsumexp(torch.cat(list(scores.values()), dim=1), dim=1)  # [b]
    else:
        log_z = torch.stack([torch.logsumexp(value, dim=1) for value in scores.values()]).mean(dim=0)  # [b]
    return (log_z - positive).sum()


def _summed_multi_positive(
    queries: Tensor,
    query_rows: Tensor,
    labels: Tensor,
    documents: Tensor,
    all_queries: Tensor,
    document_rows: Tensor,
    positives: Tensor,
    directions: tuple[str, ...],
    partition_mode: str,
    scale: float,
) -> Tensor:
    """Sum over queries of the mean over its positives ``p`` of ``-log softmax(p)``, its other positives left out.

    Of the two usual multi-positive objectives this is the one that ranks every relevant document above every
    irrelevant one: ``-log(sum_p exp s_p / Z)`` is already low once any one positive scores high, so a query's
    other relevant documents get little gradient. With one positive per query this is the classic loss. Each
    query weighs the same however many positives it has, as each row does in the single-positive loss.
    """
    scores = _at_least_fp32(queries @ documents.T * scale)  # [b, B + N]
    is_positive = positives[None, :] & (document_rows[None, :] == query_rows[:, None])  # [b, B + N]
    negatives = torch.logsumexp(scores.masked_fill(is_positive, float("-inf")), dim=1, keepdim=True)  # [b, 1]
    # -log softmax of positive p with the other positives left out: log(exp(negatives) + exp(s_p)) - s_p.
    per_positive = (torch.logaddexp(negatives, scores) - scores).masked_fill(~is_positive, 0.0)  # [b, B + N]
    return (per_positive.sum(dim=1) / is_positive.sum(dim=1)).sum()


def _at_least_fp32(scores: Tensor) -> Tensor:
    return scores.to(torch.promote_types(scores.dtype, torch.float32))


def _minus_inf(like: Tensor) -> Tensor:
    return torch.tensor(float("-inf"), dtype=like.dtype, device=like.device)


class MultipleNegativesRankingLoss(EmbeddingLoss):
    """Thin module around :func:`mnrl` so the scale and the negatives' reach are part of the config.

    Args:
        scale: inverse temperature of the softmax over cosine similarities.
        gather_across_devices: under DDP, score every query against the documents of all devices (the global
            batch), not only its own device's. The documents are all-gathered with their gradient and each
            device's labels are offset to its own positives, so the loss and the gradients equal those of one
            device holding the whole batch.
        query_chunk_size: bounds the scores in memory to ``[query_chunk_size, batch]`` blocks (see :func:`mnrl`);
            batches up to this size are scored at once.
        directions: the interaction terms, as sentence-transformers' ``directions`` (see :func:`mnrl`); the
            default ``[query_to_doc]`` is the classic loss.
        partition_mode: ``joint`` (one softmax over all directions) or ``per_direction`` (one per direction,
            averaged), as in sentence-transformers.
    """

    def __init__(
        self,
        scale: float = 20.0,
        gather_across_devices: bool = False,
        query_chunk_size: int | None = 4096,
        directions: Sequence[str] = ("query_to_doc",),
        partition_mode: str = "joint",
    ) -> None:
        super().__init__()
        check(
            is_number(scale) and scale > 0,
            "scale",
            scale,
            "the scale must be positive (an inverse temperature: 20 = temperature 0.05)",
        )
        check(
            query_chunk_size is None or is_int(query_chunk_size) and query_chunk_size >= 1,
            "query_chunk_size",
            query_chunk_size,
            "a whole number of queries >= 1, or null to score all at once",
        )
        check(is_bool(gather_across_devices), "gather_across_devices", gather_across_devices, "true or false")
        check_directions(directions, partition_mode)
        self.scale = scale
        self.gather_across_devices = gather_across_devices
        self.query_chunk_size = query_chunk_size
        self.directions = tuple(directions)  # from a Hydra ListConfig too
        self.partition_mode = partition_mode

    def forward(
        self,
        queries: Tensor,
        documents: Tensor,
        document_rows: Tensor | None = None,
        positives: Tensor | None = None,
    ) -> Tensor:
        """The loss; ``document_rows`` and ``positives`` as in :class:`~lit_embed.batch.PairBatch`."""
        rank, world = rank_and_world()
        options = {"directions": self.directions, "partition_mode": self.partition_mode}
        if not self.gather_across_devices or world == 1:
            return mnrl(
                queries,
                documents,
                self.scale,
                query_chunk_size=self.query_chunk_size,
                document_rows=document_rows,
                positives=positives,
                **options,
            )
        documents, documents_per_rank = all_gather_rows(documents)  # [sum over ranks of (B_r + N_r), D]
        queries_per_rank = gather_sizes(queries.size(0), queries.device)
        first_positive = sum(documents_per_rank[:rank])
        first_query = sum(queries_per_rank[:rank])
        if self.directions != ("query_to_doc",) or positives is not None:
            # Which query each document came with, numbered across the devices' queries, goes along with it.
            if document_rows is None:
                document_rows = torch.full((documents_per_rank[rank],), -1, device=queries.device)
                document_rows[: queries.size(0)] = torch.arange(queries.size(0), device=queries.device)
            own = torch.where(document_rows >= 0, document_rows + first_query, document_rows)  # [B + N]
            marks = positives if positives is not None else torch.zeros_like(own, dtype=torch.bool)
            layout, _ = all_gather_rows(torch.stack([own, marks.long()], dim=1))  # [sum of (B_r + N_r), 2]
            document_rows, positives = layout[:, 0], (layout[:, 1].bool() if positives is not None else None)
        all_queries = None
        if set(self.directions) & {"query_to_query", "doc_to_query"}:
            all_queries, _ = all_gather_rows(queries)  # [sum of B_r, D], with their gradient
        local = mnrl(
            queries,
            documents,
            self.scale,
            first_positive,
            self.query_chunk_size,
            all_queries=all_queries,
            first_query=first_query,
            document_rows=document_rows,
            positives=positives,
            **options,
        )
        # DDP averages the ranks' gradients; weighting by this rank's share of the queries makes that average
        # the gradient of the mean over the global batch, even when the last batches differ in size.
        return local * (queries.size(0) * world / sum(queries_per_rank))

    def embeddings_loss(self, encoder: nn.Module, batch: PairBatch, queries: Tensor, documents: Tensor) -> Tensor:
        return self(queries, documents, batch.document_rows, batch.positives)

    def scores_several_positives(self) -> bool:
        return self.directions == ("query_to_doc",)

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale}, gather_across_devices={self.gather_across_devices}, "
            f"query_chunk_size={self.query_chunk_size}, directions={list(self.directions)}, "
            f"partition_mode={self.partition_mode}"
        )
