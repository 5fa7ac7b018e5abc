"""Distillation from a teacher's scores: MarginMSE and KL divergence, equal to sentence-transformers' losses.

Both score each query only against its own candidates (its positive, then its ``k`` hard negatives) with dot
products, as sentence-transformers' ``MarginMSELoss`` and ``DistillKLDivLoss`` do by default, and fit those scores
to the teacher's scores of the same pairs (``lit-embed-score`` writes them into the data).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_embed.batch import PairBatch
from lit_embed.errors import LitEmbedError, check, is_number
from lit_embed.losses.base import EmbeddingLoss

NO_SCORES = (
    "the training data has no teacher scores: write them with `lit-embed-score IN.jsonl OUT.jsonl --teacher "
    "MODEL` (or `lit-embed-mine ... --teacher CROSS_ENCODER`) and train on OUT.jsonl"
)


def candidate_scores(queries: Tensor, candidates: Tensor) -> Tensor:
    """Dot products of each query with its own candidates: ``[B, D]`` x ``[B, 1 + k, D]`` -> ``[B, 1 + k]``."""
    return torch.einsum("bd,bcd->bc", queries, candidates)  # [B, 1 + k]


def margin_mse(queries: Tensor, candidates: Tensor, teacher_scores: Tensor) -> Tensor:
    """Mean squared error between the student's and the teacher's margins (positive minus each negative).

    Args:
        queries: ``[B, D]`` query embeddings.
        candidates: ``[B, 1 + k, D]``: query ``i``'s positive, then its ``k >= 1`` hard negatives.
        teacher_scores: ``[B, 1 + k]``: the teacher's score of each of those pairs.

    Returns:
        The mean over the ``B * k`` margins.
    """
    student = candidate_scores(queries, candidates)
    student_margins = student[:, :1] - student[:, 1:]  # [B, k]
    teacher_margins = (teacher_scores[:, :1] - teacher_scores[:, 1:]).detach()  # [B, k]
    return F.mse_loss(student_margins, teacher_margins.to(student_margins.dtype))


def kl_distill(queries: Tensor, candidates: Tensor, teacher_scores: Tensor, temperature: float = 1.0) -> Tensor:
    """KL divergence from the teacher's softmax over each query's candidates to the student's, times ``T^2``.

    Args:
        queries: ``[B, D]`` query embeddings.
        candidates: ``[B, 1 + k, D]``: query ``i``'s positive, then its ``k >= 1`` hard negatives.
        teacher_scores: ``[B, 1 + k]``: the teacher's score of each of those pairs.
        temperature: divides both sides' scores before the softmax; the ``T^2`` factor keeps the gradients'
            size independent of it.

    Returns:
        The KL divergence summed over candidates and averaged over the ``B`` queries ("batchmean").
    """
    student = candidate_scores(queries, candidates) / temperature  # [B, 1 + k]
    # The softmax in at least fp32: bf16 logits lose too much precision.
    student_log_probs = torch.log_softmax(student.to(torch.promote_types(student.dtype, torch.float32)), dim=1)
    teacher_probs = torch.softmax(teacher_scores.detach().to(student_log_probs.dtype) / temperature, dim=1)
    return F.kl_div(student_log_probs, teacher_probs, reduction="batchmean") * temperature**2


class DistillationLoss(EmbeddingLoss):
    """A loss of each query's candidates against the teacher's scores of them (``PairBatch.scores``)."""

    def forward(self, queries: Tensor, candidates: Tensor, teacher_scores: Tensor) -> Tensor:
        raise NotImplementedError

    def batch_loss(self, encoder: nn.Module, batch: PairBatch) -> Tensor:
        if batch.scores is None or batch.candidates is None:
            raise LitEmbedError(f"{type(self).__name__}: {NO_SCORES}.")
        if batch.scores.size(1) < 2:
            raise LitEmbedError(
                f"{type(self).__name__} needs at least one hard negative per query with its teacher score: mine "
                "them with `lit-embed-mine ... --teacher CROSS_ENCODER`, or keep data.max_negatives >= 1."
            )
        documents = batch.documents.embed(encoder)  # [B + N, D]
        return self(batch.queries.embed(encoder), documents[batch.candidates], batch.scores)  # [B, 1 + k, D]


def check_distillation_data(loss: nn.Module, has_teacher_scores: bool) -> None:
    """Refuses, before training, a distillation loss the data cannot feed or another loss cannot call."""
    distillation = [m for m in loss.modules() if isinstance(m, DistillationLoss)]
    if not distillation:
        return
    name = type(distillation[0]).__name__
    if not isinstance(loss, DistillationLoss):
        raise LitEmbedError(
            f"{name} scores each query against its own candidates with the teacher's scores: it cannot be wrapped "
            f"in {type(loss).__name__}. Use loss=margin_mse or loss=kl_distill on their own."
        )
    if not has_teacher_scores:
        raise LitEmbedError(f"{name}: {NO_SCORES}. Every row needs them.")


class MarginMSELoss(DistillationLoss):
    """sentence-transformers' ``MarginMSELoss`` (dot products, several negatives): see :func:`margin_mse`."""

    def forward(self, queries: Tensor, candidates: Tensor, teacher_scores: Tensor) -> Tensor:
        return margin_mse(queries, candidates, teacher_scores)


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

    def forward(self, queries: Tensor, candidates: Tensor, teacher_scores: Tensor) -> Tensor:
        return kl_distill(queries, candidates, teacher_scores, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
