"""The reranker's losses: functions of a cross-encoder's logits for each query's candidates, and their modules.

Every function takes ``logits [B, C]``: row ``i`` holds query ``i``'s candidates, column 0 its positive and the
other columns documents to rank below it (hard negatives, mined ones, other queries' documents), with ``mask
[B, C]`` marking the real ones where rows have fewer (column 0 is always real). Each equals sentence-transformers'
CrossEncoder loss of the same name on the same logits, in value and gradient (``tests/test_rerank_losses.py``).
The modules keep the one loss contract: a function of what the model made of the batch, here a reranker's
:class:`~lit_embed.batch.Scored` (``loss=rerank_bce`` ... with ``task=rerank``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_embed.batch import Scored
from lit_embed.errors import check, is_int, is_number
from lit_embed.losses.base import EmbeddingLoss
from lit_embed.losses.distill import DistillationLoss


def candidate_labels(mask: Tensor) -> Tensor:
    """``[B, C]`` relevance when each row has one positive: 1 in column 0, 0 elsewhere."""
    labels = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    labels[:, 0] = 1.0
    return labels


def binary_cross_entropy(
    logits: Tensor, mask: Tensor, labels: Tensor | None = None, pos_weight: float | None = None
) -> Tensor:
    """Pointwise (``BinaryCrossEntropyLoss``): each real candidate scored on its own as relevant (label 1) or not
    (0), averaged over the candidates; ``pos_weight`` weighs the relevant ones (sentence-transformers' reranker
    recipe uses the number of negatives a positive has)."""
    labels = candidate_labels(mask) if labels is None else labels
    weight = None if pos_weight is None else torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    losses = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), pos_weight=weight, reduction="none")
    return (losses * mask).sum() / mask.sum()  # the mean over the real candidates, without selecting them on the host


def listwise_cross_entropy(logits: Tensor, mask: Tensor, scale: float = 10.0) -> Tensor:
    """Each query's positive against all of its candidates (``MultipleNegativesRankingLoss``): the sigmoid of each
    logit times ``scale``, then softmax cross-entropy with the positive in column 0. With other queries' documents
    among the candidates this is in-batch MNRL; with only the query's own negatives, cross-entropy over its list."""
    scores = (torch.sigmoid(logits) * scale).masked_fill(~mask, float("-inf"))
    return F.cross_entropy(scores, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def margin_mse(logits: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """``MarginMSELoss``: the margin of the positive over each real negative, against the teacher's margin for the
    same pair (``teacher [B, C]``: its scores of the same candidates), mean squared error over the pairs."""
    real = mask[:, 1:]
    margins = (logits[:, :1] - logits[:, 1:])[real]
    targets = (teacher[:, :1] - teacher[:, 1:])[real].to(logits.dtype)
    return F.mse_loss(margins, targets.detach())


def lambda_loss(
    logits: Tensor,
    labels: Tensor,
    mask: Tensor,
    k: int | None = None,
    sigma: float = 1.0,
    mu: float = 10.0,
    eps: float = 1e-10,
) -> Tensor:
    """``LambdaLoss`` with its default NDCGLoss2++ weights: for every pair of candidates ranked in the wrong order
    by the logits (the more relevant one below), a logistic loss weighted by how much swapping them moves NDCG, in
    bits; pairs with neither candidate in the top ``k`` (default: all) are left out.

    Args:
        logits: ``[B, C]`` the model's scores.
        labels: ``[B, C]`` graded relevance (e.g. 1 for the positive, 0 for the others).
        mask: ``[B, C]`` the real candidates.
    """
    size = logits.size(1)
    logits = logits.float().masked_fill(~mask, -1e16)
    labels = labels.float().masked_fill(~mask, float("-inf"))
    logits_sorted, order = logits.sort(descending=True, dim=-1)
    labels_ideal, _ = labels.sort(descending=True, dim=-1)
    true_sorted = labels.gather(1, order)  # the labels in the order the logits rank them
    true_diffs = true_sorted[:, :, None] - true_sorted[:, None, :]
    pairs = torch.isfinite(true_diffs) & (true_diffs > 0)
    k = k or size
    in_top_k = torch.zeros((size, size), dtype=torch.bool, device=logits.device)
    in_top_k[:k, :] = True
    in_top_k[:, :k] = True
    true_sorted, labels_ideal = true_sorted.clamp(min=0.0), labels_ideal.clamp(min=0.0)
    positions = torch.arange(1, size + 1, device=logits.device)
    discount = torch.log2(1.0 + positions.float())[None, :]  # [1, C]
    max_dcg = ((2**labels_ideal - 1) / discount)[:, :k].sum(dim=-1).clamp(min=eps)
    gain = (2**true_sorted - 1) / max_dcg[:, None]  # [B, C]
    gain_diffs = (gain[:, :, None] - gain[:, None, :]).abs()
    # NDCGLoss2: the change of the discount between rank distances |i - j| and |i - j| + 1.
    distance = (positions[:, None] - positions[None, :]).abs()
    deltas = (discount[0, distance - 1].abs().pow(-1.0) - discount[0, distance].abs().pow(-1.0)).abs()
    deltas.fill_diagonal_(0.0)
    # LambdaRank: the change of the discount between ranks i and j.
    lambda_rank = (discount[:, :, None].pow(-1.0) - discount[:, None, :].pow(-1.0)).abs()
    weights = mu * deltas[None] * gain_diffs + lambda_rank * gain_diffs
    score_diffs = (logits_sorted[:, :, None] - logits_sorted[:, None, :]).clamp(min=-1e8, max=1e8)
    score_diffs = score_diffs.masked_fill(torch.isnan(score_diffs), 0.0)
    losses = weights * F.logsigmoid(sigma * score_diffs) / math.log(2)
    kept = losses[pairs & in_top_k]
    return -kept.sum() / max(kept.numel(), 1)


class RerankLoss(EmbeddingLoss):
    """A reranker's loss: ``loss(Scored) -> scalar`` (:class:`~lit_embed.batch.Scored`: each query's candidates'
    logits, column 0 its positive).

    Attributes:
        in_batch_negatives: how many other queries' positives each query's candidates include besides its own
            negatives (the data module lays the batch out for it).
    """

    def __init__(self, in_batch_negatives: int = 0) -> None:
        super().__init__()
        check(
            is_int(in_batch_negatives) and in_batch_negatives >= 0,
            "in_batch_negatives",
            in_batch_negatives,
            "a whole number >= 0",
        )
        self.in_batch_negatives = in_batch_negatives

    def forward(self, scored: Scored) -> Tensor:  # type: ignore[override]
        raise NotImplementedError


class RerankBCELoss(RerankLoss):
    """``BinaryCrossEntropyLoss``: see :func:`binary_cross_entropy`.

    Args:
        pos_weight: the weight of a positive's term (sentence-transformers' recipe: its number of negatives); None
            weighs every candidate alike.
    """

    def __init__(self, pos_weight: float | None = None) -> None:
        super().__init__()
        check(
            pos_weight is None or is_number(pos_weight) and pos_weight > 0,
            "pos_weight",
            pos_weight,
            "a number > 0, or null",
        )
        self.pos_weight = pos_weight

    def forward(self, scored: Scored) -> Tensor:  # type: ignore[override]
        return binary_cross_entropy(scored.logits, scored.mask, pos_weight=self.pos_weight)


class RerankCrossEntropyLoss(RerankLoss):
    """``CrossEntropyLoss`` over a query's candidates (positive + its negatives), or with ``in_batch_negatives``
    other queries' positives among them ``MultipleNegativesRankingLoss``: see :func:`listwise_cross_entropy`.

    Args:
        scale: multiplies the sigmoid of each logit before the softmax (sentence-transformers' default 10).
        in_batch_negatives: other queries' positives added to each query's candidates (its ``num_negatives``).
    """

    def __init__(self, scale: float = 10.0, in_batch_negatives: int = 0) -> None:
        super().__init__(in_batch_negatives)
        check(is_number(scale) and scale > 0, "scale", scale, "a number > 0")
        self.scale = scale

    def forward(self, scored: Scored) -> Tensor:  # type: ignore[override]
        return listwise_cross_entropy(scored.logits, scored.mask, self.scale)


class RerankLambdaLoss(RerankLoss):
    """``LambdaLoss`` (NDCGLoss2++ weights) over each query's candidates: see :func:`lambda_loss`.

    Args:
        k: only pairs with a candidate in the top ``k`` count (None: all).
    """

    def __init__(self, k: int | None = None, in_batch_negatives: int = 0) -> None:
        super().__init__(in_batch_negatives)
        check(k is None or is_int(k) and k >= 1, "k", k, "a whole number >= 1, or null for all candidates")
        self.k = k

    def forward(self, scored: Scored) -> Tensor:  # type: ignore[override]
        return lambda_loss(scored.logits, candidate_labels(scored.mask), scored.mask, self.k)


class RerankMarginMSELoss(RerankLoss, DistillationLoss):
    """``MarginMSELoss`` against a teacher's scores of each query's candidates (``lit-embed-score`` output): see
    :func:`margin_mse`."""

    def forward(self, scored: Scored) -> Tensor:  # type: ignore[override]
        assert scored.teacher is not None, "check_distillation_data refuses data without scores"
        mask = scored.mask & torch.isfinite(scored.teacher)
        return margin_mse(scored.logits, scored.teacher.nan_to_num(), mask)
