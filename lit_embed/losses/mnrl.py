"""MultipleNegativesRankingLoss (InfoNCE) with in-batch and optional hard negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lit_embed.distributed import all_gather_rows, gather_sizes, rank_and_world
from lit_embed.errors import check, is_bool, is_int, is_number
from lit_embed.losses.base import EmbeddingLoss


def mnrl(
    queries: Tensor,
    documents: Tensor,
    scale: float = 20.0,
    first_positive: int = 0,
    query_chunk_size: int | None = None,
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

    Returns:
        The mean loss over the ``B`` queries.
    """
    if documents.size(0) < first_positive + queries.size(0):
        raise ValueError(
            f"need at least one positive per query: {queries.size(0)} queries, {documents.size(0)} documents"
        )
    queries, documents = F.normalize(queries, dim=-1), F.normalize(documents, dim=-1)
    labels = torch.arange(queries.size(0), device=queries.device) + first_positive  # query i's positive
    size = queries.size(0)
    if query_chunk_size is None or size <= query_chunk_size:
        return _summed_cross_entropy(queries, documents, labels, scale) / size
    total = sum(
        checkpoint(
            _summed_cross_entropy,
            queries[start : start + query_chunk_size],
            documents,
            labels[start : start + query_chunk_size],
            scale,
            use_reentrant=False,
        )
        for start in range(0, size, query_chunk_size)
    )
    return total / size


def _summed_cross_entropy(queries: Tensor, documents: Tensor, labels: Tensor, scale: float) -> Tensor:
    scores = queries @ documents.T * scale  # [b, B + N]
    # bf16/fp16 logits lose too much precision in the softmax; compute it in at least fp32.
    return F.cross_entropy(scores.to(torch.promote_types(scores.dtype, torch.float32)), labels, reduction="sum")


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
    """

    def __init__(
        self, scale: float = 20.0, gather_across_devices: bool = False, query_chunk_size: int | None = 4096
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
        self.scale = scale
        self.gather_across_devices = gather_across_devices
        self.query_chunk_size = query_chunk_size

    def forward(self, queries: Tensor, documents: Tensor) -> Tensor:
        rank, world = rank_and_world()
        if not self.gather_across_devices or world == 1:
            return mnrl(queries, documents, self.scale, query_chunk_size=self.query_chunk_size)
        documents, documents_per_rank = all_gather_rows(documents)  # [sum over ranks of (B_r + N_r), D]
        queries_per_rank = gather_sizes(queries.size(0), queries.device)
        first_positive = sum(documents_per_rank[:rank])
        local = mnrl(queries, documents, self.scale, first_positive, self.query_chunk_size)
        # DDP averages the ranks' gradients; weighting by this rank's share of the queries makes that average
        # the gradient of the mean over the global batch, even when the last batches differ in size.
        return local * (queries.size(0) * world / sum(queries_per_rank))

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale}, gather_across_devices={self.gather_across_devices}, "
            f"query_chunk_size={self.query_chunk_size}"
        )
