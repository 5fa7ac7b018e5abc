"""MatryoshkaLoss: a loss applied to nested prefixes of the embeddings, so a prefix is a usable smaller embedding."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch.nn.functional as F
from torch import Tensor, nn

from lit_embed.batch import Embedded
from lit_embed.errors import LitEmbedError, is_int, is_number
from lit_embed.losses.base import EmbeddingLoss


def matryoshka(
    loss: Callable[[Embedded], Tensor], embedded: Embedded, dims: Sequence[int], weights: Sequence[float]
) -> Tensor:
    """Weighted sum over ``dims`` of ``loss`` on the first ``d`` dimensions of the queries and documents.

    Args:
        loss: ``loss(Embedded) -> scalar``, e.g. a ``MultipleNegativesRankingLoss``.
        embedded: the batch, ``queries [B, D]`` and ``documents [B + N, D]``.
        dims: the prefix sizes, each at most ``D``.
        weights: one weight per entry of ``dims``.

    Returns:
        ``sum(w * loss(embedded with queries[:, :d], documents[:, :d]))`` over ``zip(dims, weights)``.
    """
    size = embedded.queries.size(-1)
    if max(dims) > size:
        raise LitEmbedError(
            f"loss.dims {list(dims)} has sizes larger than the embedding size {size} of the model: keep every "
            f"entry of loss.dims at most {size} (e.g. loss.dims=[{size},{size // 2}])."
        )
    total = 0.0
    for dim, weight in zip(dims, weights, strict=True):
        # Renormalized as sentence-transformers' MatryoshkaLoss does, so a loss on dot products sees unit vectors
        # at every size, not prefixes that shrink in norm as d drops.
        prefix = replace(
            embedded,
            queries=F.normalize(embedded.queries[:, :dim], dim=-1),  # [B, d]
            documents=F.normalize(embedded.documents[:, :dim], dim=-1),  # [B + N, d]
        )
        total = total + weight * loss(prefix)
    return total


class MatryoshkaLoss(EmbeddingLoss):
    """Trains nested embedding sizes: the wrapped loss on the first ``d`` dimensions, for each ``d`` in ``dims``.

    Same definition and defaults as sentence-transformers' ``MatryoshkaLoss`` (every size, weights of 1), for
    any loss. Include the full embedding size in ``dims``, or the full embeddings are not trained directly. Measure
    a smaller size with ``eval.truncate_dim`` (``lit-embed-eval --truncate-dim``) and use it with
    ``SentenceTransformer(path, truncate_dim=...)``. With ``loss.loss=cached_mnrl``'s GradCache inside, the batch
    is embedded by GradCache for this whole loss (see :func:`lit_embed.training.steps.split_step`).

    Args:
        loss: the loss to apply at every size, e.g. :class:`~lit_embed.losses.mnrl.MultipleNegativesRankingLoss`.
        dims: the embedding sizes to train, e.g. ``[384, 256, 128, 64]``.
        weights: one weight per size (None = 1 each).
    """

    def __init__(self, loss: nn.Module, dims: Sequence[int], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.loss = loss
        if isinstance(dims, str | int) or not all(is_int(d) for d in dims):
            raise LitEmbedError(f"loss.dims needs a list of embedding sizes such as [384,256,128], got {dims!r}.")
        self.dims = tuple(int(d) for d in dims)  # from a Hydra ListConfig too
        if not self.dims or min(self.dims) < 1:
            raise LitEmbedError(f"loss.dims needs one or more positive embedding sizes, got {list(self.dims)}.")
        if weights is not None and (isinstance(weights, str | int | float) or not all(is_number(w) for w in weights)):
            raise LitEmbedError(f"loss.weights needs a list of numbers, one per entry of loss.dims, got {weights!r}.")
        self.weights = tuple(float(w) for w in weights) if weights is not None else (1.0,) * len(self.dims)
        if len(self.weights) != len(self.dims):
            raise LitEmbedError(
                f"loss.weights needs one weight per entry of loss.dims: {len(self.dims)} dims {list(self.dims)}, "
                f"{len(self.weights)} weights {list(self.weights)}. Set loss.weights=null for 1 each."
            )

    def forward(self, embedded: Embedded) -> Tensor:
        return matryoshka(self.loss, embedded, self.dims, self.weights)

    def scores_several_positives(self) -> bool:
        return self.loss.scores_several_positives()

    def extra_repr(self) -> str:
        return f"dims={list(self.dims)}, weights={list(self.weights)}"
