"""Distillation from a teacher's scores: MarginMSE and KL divergence, equal to sentence-transformers' losses.

Both score each query only against its own candidates (its positive, then its ``k`` hard negatives) with dot
products, as sentence-transformers' ``MarginMSELoss`` and ``DistillKLDivLoss`` do by default, and fit those scores
to the teacher's scores of the same pairs (``lit-embed-score`` writes them into the data).

Mined data gives rows different numbers of negatives (none, when the margin dropped them all): a batch pads its
candidates to its largest ``k`` and a ``mask`` marks the real ones. Each loss then equals the same loss computed on
every row's own candidates, and a row without negatives adds nothing to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_embed.batch import Embedded
from lit_embed.errors import LitEmbedError, check, is_number
from lit_embed.losses.base import EmbeddingLoss

NO_SCORES = (
    "the training data has no teacher scores of hard negatives: mine negatives with `lit-embed-mine`, write the "
    "teacher's scores with `lit-embed-score IN.jsonl OUT.jsonl --teacher MODEL` (or do both with `lit-embed-mine ... "
    "--teacher CROSS_ENCODER`) and train on OUT.jsonl"
)


def candidate_scores(queries: Tensor, candidates: Tensor) -> Tensor:
    """Dot products of each query with its own candidates: ``[B, D]`` x ``[B, 1 + k, D]`` -> ``[B, 1 + k]``."""
    return torch.einsum("bd,bcd->bc", queries, candidates)  # [B, 1 + k]


def margin_mse(queries: Tensor, candidates: Tensor, teacher_scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error between the student's and the teacher's margins (positive minus each negative).

    Args:
        queries: ``[B, D]`` query embeddings.
        candidates: ``[B, 1 + k, D]``: query ``i``'s positive, then its hard negatives.
        teacher_scores: ``[B, 1 + k]``: the teacher's score of each of those pairs.
        mask: ``[B, 1 + k]`` bool, which candidates are real (column 0, the positive, always is); the others are
            padding whose scores are never read. None: all are.

    Returns:
        The mean over the real margins (``B * k`` when nothing is padded); 0, still part of the graph, when there
        are none.
    """
    student = candidate_scores(queries, candidates)  # [B, 1 + k]
    valid = torch.ones_like(student, dtype=torch.bool) if mask is None else mask.bool()
    student_margins = student[:, :1] - student[:, 1:]  # [B, k]
    teacher_margins = (teacher_scores[:, :1] - teacher_scores[:, 1:]).detach()  # [B, k]
    # Filled, not indexed: padded teacher scores may be NaN, and the count stays on the device (no sync).
    errors = (student_margins - teacher_margins.to(student_margins.dtype)).masked_fill(~valid[:, 1:], 0)
    return errors.square().sum() / valid[:, 1:].sum().clamp(min=1)


def kl_distill(
    queries: Tensor,
    candidates: Tensor,
    teacher_scores: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """KL divergence from the teacher's softmax over each query's candidates to the student's, times ``T^2``.

    Args:
        queries: ``[B, D]`` query embeddings.
        candidates: ``[B, 1 + k, D]``: query ``i``'s positive, then its hard negatives.
        teacher_scores: ``[B, 1 + k]``: the teacher's score of each of those pairs.
        temperature: divides both sides' scores before the softmax; the ``T^2`` factor keeps the gradients'
            size independent of it.
        mask: ``[B, 1 + k]`` bool, which candidates are real (column 0, the positive, always is); both softmaxes
            run over a row's real candidates only. None: all are.

    Returns:
        The KL divergence summed over each row's candidates and averaged over the ``B`` rows ("batchmean"). A row
        without negatives has one candidate, probability 1 on both sides, and so a KL of 0.
    """
    student = candidate_scores(queries, candidates) / temperature  # [B, 1 + k]
    padded = torch.zeros_like(student, dtype=torch.bool) if mask is None else ~mask.bool()
    # The softmax in at least fp32: bf16 logits lose too much precision.
    student = student.to(torch.promote_types(student.dtype, torch.float32)).masked_fill(padded, -torch.inf)
    # Padded slots get log-probability 0 and probability 0, so kl_div adds exactly 0 for them (not 0 * inf).
    student_log_probs = torch.log_softmax(student, dim=1).masked_fill(padded, 0)
    teacher = teacher_scores.detach().to(student.dtype).masked_fill(padded, -torch.inf) / temperature
    teacher_probs = torch.softmax(teacher, dim=1)
    return F.kl_div(student_log_probs, teacher_probs, reduction="batchmean") * temperature**2


def own_candidates(embedded: Embedded, loss: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """``(candidates [B, 1 + k, D], teacher scores [B, 1 + k], mask [B, 1 + k])``: each query's positive and hard
    negatives, as the batch's ``candidates`` name them; refuses a batch without a teacher's scores."""
    if embedded.scores is None or embedded.candidates is None:
        raise LitEmbedError(f"{type(loss).__name__}: {NO_SCORES}.")
    mask = embedded.candidates >= 0  # [B, 1 + k]: -1 pads a row with fewer negatives than the batch's most
    candidates = embedded.documents[embedded.candidates.clamp(min=0)]  # [B, 1 + k, D]; padding takes row 0, masked
    return candidates, embedded.scores, mask


class DistillationLoss(EmbeddingLoss):
    """A loss of each query's candidates against the teacher's scores of them (``PairBatch.scores``)."""


def check_distillation_data(loss: nn.Module, has_teacher_scores: bool) -> None:
    """Refuses, before training, a distillation loss on data without a teacher's scores."""
    distillation = [m for m in loss.modules() if isinstance(m, DistillationLoss)]
    if distillation and not has_teacher_scores:
        raise LitEmbedError(
            f"{type(distillation[0]).__name__}: {NO_SCORES}. Every row needs scores, and at least one row a hard "
            "negative (data.max_negatives >= 1)."
        )


class MarginMSELoss(DistillationLoss):
    """sentence-transformers' ``MarginMSELoss`` (dot products, several negatives): see :func:`margin_mse`."""

    def forward(self, embedded: Embedded) -> Tensor:
        return margin_mse(embedded.queries, *own_candidates(embedded, self))


class KLDistillLoss(DistillationLoss):
    """sentence-transformers' ``DistillKLDivLoss`` (dot products): see :func:`kl_distill`.

    Args:
        temperature: softens both the student's and the teacher's distributions (1 = the scores as they are).
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        check(
            is_number(temperature) and 0 < temperature < float("inf"),
            "temperature",
            temperature,
            "a positive finite number (1 = the scores as they are)",
        )
        self.temperature = temperature

    def forward(self, embedded: Embedded) -> Tensor:
        candidates, teacher_scores, mask = own_candidates(embedded, self)
        return kl_distill(embedded.queries, candidates, teacher_scores, self.temperature, mask)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
