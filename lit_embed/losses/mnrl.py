"""MultipleNegativesRankingLoss (InfoNCE) with in-batch and optional hard negatives."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lit_embed.batch import Embedded
from lit_embed.distributed import all_gather_rows, gather_sizes, rank_and_world
from lit_embed.errors import LitEmbedError, check, is_bool, is_int, is_number
from lit_embed.losses.base import EmbeddingLoss

# The interaction terms of sentence-transformers' MultipleNegativesRankingLoss (v6), scored the same way.
DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
PARTITION_MODES = ("joint", "per_direction")
# Directions whose candidates never hold the positive: a softmax of their own would have no target.
_SAME_SIDE = ("query_to_query", "doc_to_doc")


def mnrl(
    embedded: Embedded,
    scale: float = 20.0,
    directions: Sequence[str] = ("query_to_doc",),
    partition_mode: str = "joint",
    gather_across_devices: bool = False,
    query_chunk_size: int | None = None,
) -> Tensor:
    """Cross-entropy of each query against every document in the batch, its own positive being the target.

    Every document is a candidate for every query (in-batch negatives), so the hard negatives of one query are also
    negatives for all others, exactly as in sentence-transformers' MultipleNegativesRankingLoss.

    Args:
        embedded: ``queries [B, D]``, ``documents [B + N, D]`` (row ``i < B`` is query ``i``'s positive), and which
            query each document came with (``document_rows``) and which are positives (``positives``: several per
            query trains each against the non-positives, the other positives left out; then only ``query_to_doc``).
        scale: inverse temperature applied to the cosine similarities (20 = temperature 0.05).
        directions: the interaction terms, as sentence-transformers' ``directions``: ``query_to_doc`` (always
            included: it holds the positive), ``query_to_query`` (query ``i`` against every other query),
            ``doc_to_query`` (positive ``i`` against every query) and ``doc_to_doc`` (positive ``i`` against every
            document not given with query ``i``).
        partition_mode: ``joint`` = one softmax over every direction's scores; ``per_direction`` = the mean of
            one log-normaliser per direction (only with ``query_to_doc`` and ``doc_to_query``).
        gather_across_devices: under DDP, every rank's documents (and queries, for the query-side directions) are
            candidates, gathered with their gradient; ranks may hold batches of different sizes.
        query_chunk_size: score at most this many queries at once, and again in the backward pass, so only a
            ``[query_chunk_size, B + N]`` block of scores is ever in memory (None: all ``B`` at once). The
            ``[B, B + N]`` scores of a 65,536-pair batch alone would take 17 GB in fp32.

    Returns:
        The mean loss over the ``B`` queries (over the global batch's queries, under DDP's gradient averaging).
    """
    directions = tuple(directions)
    several = embedded.positives is not None
    check_directions(directions, partition_mode, multi_positive=several)
    queries, documents = embedded.queries, embedded.documents  # [B, D], [C = B + N, D]
    size, device = queries.size(0), queries.device
    if documents.size(0) < size:
        raise ValueError(f"need at least one positive per query: {size} queries, {documents.size(0)} documents")
    rows = torch.arange(size, device=device)  # [B]
    owners = embedded.document_rows  # [C]: the query each document came with (-1: none)
    if owners is None:
        owners = F.pad(rows, (0, documents.size(0) - size), value=-1)
    positives = embedded.positives  # [C] bool
    all_queries, first_query, first_positive, share = queries, 0, 0, 1.0
    rank, world = rank_and_world()
    if gather_across_devices and world > 1:
        queries_per_rank = gather_sizes(size, device)
        first_query = sum(queries_per_rank[:rank])  # this rank's queries among all ranks' (for the query directions)
        documents, documents_per_rank = all_gather_rows(documents)  # [C_all, D], with their gradient
        first_positive = sum(documents_per_rank[:rank])  # where this rank's documents start among them
        marks = positives if several else torch.zeros_like(owners, dtype=torch.bool)
        own = torch.where(owners >= 0, owners + first_query, owners)  # [C]: numbered across the ranks' queries
        layout, _ = all_gather_rows(torch.stack([own, marks.long()], dim=1))  # [C_all, 2]
        owners, positives = layout[:, 0], (layout[:, 1].bool() if several else None)  # [C_all]
        if set(directions) & {"query_to_query", "doc_to_query"}:
            all_queries, _ = all_gather_rows(queries)  # [Q, D], with their gradient
        # DDP averages the ranks' gradients; weighting by this rank's share of the queries makes that average
        # the gradient of the mean over the global batch, even when the last batches differ in size.
        share = size * world / sum(queries_per_rank)
    queries, documents = F.normalize(queries, dim=-1), F.normalize(documents, dim=-1)
    all_queries = F.normalize(all_queries, dim=-1) if all_queries is not embedded.queries else queries  # [Q, D]
    query_rows = rows + first_query  # [B]: each query's row in all_queries, and the owner its documents carry
    labels = rows + first_positive  # [B]: each query's (first) positive among the documents

    def summed(block: slice) -> Tensor:
        """The loss summed over the queries of ``block`` (``b`` of them)."""
        q, mine, label = queries[block], query_rows[block], labels[block]  # [b, D], [b], [b]
        scores = [q @ documents.T]  # query_to_doc: [b, C]
        own_documents = documents[label] if len(directions) > 1 else None  # [b, D]: each query's positive
        if "query_to_query" in directions:  # every other query; itself left out
            to_queries = q @ all_queries.T  # [b, Q]
            itself = (torch.arange(q.size(0), device=device), mine)
            scores.append(to_queries.index_put(itself, to_queries.new_tensor(float("-inf"))))
        if "doc_to_query" in directions:
            scores.append(own_documents @ all_queries.T)  # [b, Q]
        if "doc_to_doc" in directions:  # every document not given with this query
            same_query = owners[None, :] == mine[:, None]  # [b, C]
            scores.append((own_documents @ documents.T).masked_fill(same_query, float("-inf")))  # [b, C]
        # bf16/fp16 logits lose too much precision in the softmax; compute it in at least fp32.
        scores = [_at_least_fp32(block_scores * scale) for block_scores in scores]
        if several:  # mean over its positives p of -log softmax(p), its other positives left out
            is_positive = positives[None, :] & (owners[None, :] == mine[:, None])  # [b, C]
            negatives = torch.logsumexp(scores[0].masked_fill(is_positive, float("-inf")), 1, keepdim=True)  # [b, 1]
            per_positive = (torch.logaddexp(negatives, scores[0]) - scores[0]).masked_fill(~is_positive, 0.0)  # [b, C]
            return (per_positive.sum(dim=1) / is_positive.sum(dim=1)).sum()
        if partition_mode == "per_direction":  # one log-normaliser per direction, averaged
            positive = scores[0].gather(1, label[:, None])[:, 0]  # [b]
            return (torch.stack([torch.logsumexp(s, dim=1) for s in scores]).mean(dim=0) - positive).sum()
        logits = scores[0] if len(scores) == 1 else torch.cat(scores, dim=1)  # [b, C (+ Q ...)]: one softmax
        return F.cross_entropy(logits, label, reduction="sum")

    if query_chunk_size is None or size <= query_chunk_size:
        return summed(slice(0, size)) / size * share
    blocks = (slice(start, start + query_chunk_size) for start in range(0, size, query_chunk_size))
    return sum(checkpoint(summed, block, use_reentrant=False) for block in blocks) / size * share


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


def _at_least_fp32(scores: Tensor) -> Tensor:
    return scores.to(torch.promote_types(scores.dtype, torch.float32))


class MultipleNegativesRankingLoss(EmbeddingLoss):
    """:func:`mnrl` with its settings as part of the config.

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

    def forward(self, embedded: Embedded) -> Tensor:
        return mnrl(
            embedded,
            self.scale,
            self.directions,
            self.partition_mode,
            self.gather_across_devices,
            self.query_chunk_size,
        )

    def scores_several_positives(self) -> bool:
        return self.directions == ("query_to_doc",)

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale}, gather_across_devices={self.gather_across_devices}, "
            f"query_chunk_size={self.query_chunk_size}, directions={list(self.directions)}, "
            f"partition_mode={self.partition_mode}"
        )
