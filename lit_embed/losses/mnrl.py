"""MultipleNegativesRankingLoss (InfoNCE) with in-batch and optional hard negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mnrl(queries: Tensor, documents: Tensor, scale: float = 20.0) -> Tensor:
    """Cross-entropy of each query against every document in the batch, its own positive being the target.

    Args:
        queries: ``[B, D]`` query embeddings.
        documents: ``[B + N, D]``: row ``i < B`` is query ``i``'s positive; the ``N`` rows after them are hard
            negatives. Every document is a candidate for every query (in-batch negatives), so the hard
            negatives of one query are also negatives for all others, exactly as in sentence-transformers.
        scale: inverse temperature applied to the cosine similarities (20 = temperature 0.05).

    Returns:
        The mean loss over the ``B`` queries.
    """
    if documents.size(0) < queries.size(0):
        raise ValueError(
            f"need at least one positive per query: {queries.size(0)} queries, {documents.size(0)} documents"
        )
    scores = F.normalize(queries, dim=-1) @ F.normalize(documents, dim=-1).T * scale  # [B, B + N]
    labels = torch.arange(queries.size(0), device=queries.device)  # query i's positive is document i
    # bf16/fp16 logits lose too much precision in the softmax; compute it in at least fp32.
    return F.cross_entropy(scores.to(torch.promote_types(scores.dtype, torch.float32)), labels)


class MultipleNegativesRankingLoss(nn.Module):
    """Thin module around :func:`mnrl` so the scale is part of the config.

    Args:
        scale: inverse temperature of the softmax over cosine similarities.
    """

    def __init__(self, scale: float = 20.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"loss.scale must be positive, got {scale}")
        self.scale = scale

    def forward(self, queries: Tensor, documents: Tensor) -> Tensor:
        return mnrl(queries, documents, self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"
