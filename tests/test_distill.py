"""The distillation losses equal sentence-transformers' MarginMSELoss and DistillKLDivLoss on the same embeddings."""

from __future__ import annotations

import pytest
import torch
from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss, MarginMSELoss

from lit_embed.batch import PairBatch, TokenGroups
from lit_embed.errors import InvalidValueError, LitEmbedError
from lit_embed.losses.distill import KLDistillLoss
from lit_embed.losses.distill import MarginMSELoss as OurMarginMSE


@pytest.fixture(scope="module")
def st_model(tiny_model_path: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(tiny_model_path, device="cpu")


def columns(num_negatives: int, batch: int = 10, dim: int = 16) -> tuple[list[torch.Tensor], torch.Tensor]:
    """sentence-transformers' columns (query, positive, negatives...) and the teacher's ``[B, 1 + k]`` scores."""
    torch.manual_seed(num_negatives)
    embeddings = [torch.randn(batch, dim, dtype=torch.float64) for _ in range(2 + num_negatives)]
    return embeddings, torch.randn(batch, 1 + num_negatives, dtype=torch.float64) * 3


def ours(loss: torch.nn.Module, embeddings: list[torch.Tensor], scores: torch.Tensor) -> torch.Tensor:
    return loss(embeddings[0], torch.stack(embeddings[1:], dim=1), scores)  # candidates [B, 1 + k, D]


@pytest.mark.parametrize("num_negatives", [1, 3])
def test_margin_mse_equals_sentence_transformers(st_model, num_negatives: int) -> None:
    embeddings, scores = columns(num_negatives)
    expected = MarginMSELoss(st_model).compute_loss_from_embeddings(embeddings, scores)
    assert ours(OurMarginMSE(), embeddings, scores).item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize(("num_negatives", "temperature"), [(1, 1.0), (3, 1.0), (3, 0.5), (4, 2.0)])
def test_kl_distill_equals_sentence_transformers(st_model, num_negatives: int, temperature: float) -> None:
    embeddings, scores = columns(num_negatives)
    expected = DistillKLDivLoss(st_model, temperature=temperature).compute_loss_from_embeddings(embeddings, scores)
    loss = ours(KLDistillLoss(temperature), embeddings, scores)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_gradients_equal_sentence_transformers(st_model) -> None:
    embeddings, scores = columns(2)
    embeddings = [e.float().requires_grad_() for e in embeddings]
    for st_loss, loss in ((MarginMSELoss(st_model), OurMarginMSE()), (DistillKLDivLoss(st_model), KLDistillLoss())):
        st_loss.compute_loss_from_embeddings(embeddings, scores.float()).backward()
        expected = [e.grad.clone() for e in embeddings]
        for e in embeddings:
            e.grad = None
        ours(loss, embeddings, scores.float()).backward()
        torch.testing.assert_close([e.grad for e in embeddings], expected, atol=1e-6, rtol=0)
        for e in embeddings:
            e.grad = None


def test_batch_loss_takes_each_querys_own_candidates() -> None:
    """The candidates index the batch's documents: positives first, then each row's negatives."""
    torch.manual_seed(0)
    queries, documents = torch.randn(3, 8), torch.randn(3 + 6, 8)
    candidates = torch.tensor([[0, 3, 4], [1, 5, 6], [2, 7, 8]])
    scores = torch.randn(3, 3)
    batch = PairBatch(
        TokenGroups([{"x": queries}], torch.arange(3)),
        TokenGroups([{"x": documents}], torch.arange(9)),
        scores=scores,
        candidates=candidates,
    )
    encoder = lambda features: features["x"]  # noqa: E731
    for loss in (OurMarginMSE(), KLDistillLoss(0.5)):
        assert loss.batch_loss(encoder, batch) == loss(queries, documents[candidates], scores)


def test_refuses_a_batch_without_scores_or_negatives() -> None:
    groups = TokenGroups([{"x": torch.randn(2, 4)}], torch.arange(2))
    with pytest.raises(LitEmbedError, match="lit-embed-score"):
        OurMarginMSE().batch_loss(lambda f: f["x"], PairBatch(groups, groups))
    positives_only = PairBatch(groups, groups, scores=torch.randn(2, 1), candidates=torch.arange(2)[:, None])
    with pytest.raises(LitEmbedError, match="at least one hard negative"):
        KLDistillLoss().batch_loss(lambda f: f["x"], positives_only)
    with pytest.raises(InvalidValueError, match="temperature"):
        KLDistillLoss(temperature=0)


@pytest.mark.parametrize(("name", "cls"), [("margin_mse", OurMarginMSE), ("kl_distill", KLDistillLoss)])
def test_configs_build_the_losses(name: str, cls: type) -> None:
    from helpers import compose_train

    from lit_embed.config import build

    assert isinstance(build(compose_train([f"loss={name}"]).loss, "loss"), cls)
