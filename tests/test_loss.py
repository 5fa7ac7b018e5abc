"""The loss equals sentence-transformers' MultipleNegativesRankingLoss on the same embeddings."""

from __future__ import annotations

import pytest
import torch
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as STMNRL

from lit_embed.losses.mnrl import MultipleNegativesRankingLoss, mnrl


@pytest.fixture(scope="module")
def st_loss(tiny_model_path: str) -> STMNRL:
    from sentence_transformers import SentenceTransformer

    return STMNRL(SentenceTransformer(tiny_model_path, device="cpu"), scale=20.0)


@pytest.mark.parametrize("num_negative_columns", [0, 1, 3])
def test_equals_sentence_transformers(st_loss: STMNRL, num_negative_columns: int) -> None:
    torch.manual_seed(num_negative_columns)
    batch, dim = 12, 32
    queries = torch.randn(batch, dim, dtype=torch.float64)
    positives = torch.randn(batch, dim, dtype=torch.float64)
    negatives = [torch.randn(batch, dim, dtype=torch.float64) for _ in range(num_negative_columns)]
    expected = st_loss.compute_loss_from_embeddings([queries, positives, *negatives], labels=None)
    # Ours takes the documents as one list: positives first, then each query's negatives in any order.
    per_query_negatives = torch.stack(negatives, dim=1).reshape(-1, dim) if negatives else torch.empty(0, dim)
    ours = mnrl(queries, torch.cat([positives, per_query_negatives.double()]), scale=20.0)
    assert ours.item() == pytest.approx(expected.item(), abs=1e-6)


def test_gradients_equal_sentence_transformers(st_loss: STMNRL) -> None:
    torch.manual_seed(0)
    q = torch.randn(8, 16, requires_grad=True)
    d = torch.randn(8, 16, requires_grad=True)
    st_loss.compute_loss_from_embeddings([q, d], labels=None).backward()
    expected = q.grad.clone(), d.grad.clone()
    q.grad = d.grad = None
    MultipleNegativesRankingLoss(scale=20.0)(q, d).backward()
    torch.testing.assert_close((q.grad, d.grad), expected, atol=1e-6, rtol=0)


def test_scale_changes_the_loss_and_must_be_positive() -> None:
    q, d = torch.randn(4, 8), torch.randn(4, 8)
    assert mnrl(q, d, scale=20.0) != mnrl(q, d, scale=1.0)
    with pytest.raises(ValueError, match="scale must be positive"):
        MultipleNegativesRankingLoss(scale=0)


def test_perfect_alignment_gives_low_loss() -> None:
    q = torch.eye(6)
    assert mnrl(q, q.clone(), scale=20.0) < 1e-6
    with pytest.raises(ValueError, match="at least one positive per query"):
        mnrl(torch.randn(4, 8), torch.randn(3, 8))


@pytest.mark.parametrize("num_negatives", [0, 5])
def test_query_chunks_give_the_same_loss_and_gradients(num_negatives: int) -> None:
    torch.manual_seed(3)
    q = torch.randn(10, 16, requires_grad=True)
    d = torch.randn(10 + num_negatives, 16, requires_grad=True)
    mnrl(q, d).backward()
    expected = q.grad.clone(), d.grad.clone()
    q.grad = d.grad = None
    chunked = MultipleNegativesRankingLoss(query_chunk_size=3)
    loss = chunked(q, d)
    loss.backward()
    assert loss.item() == pytest.approx(mnrl(q, d).item(), abs=1e-6)
    torch.testing.assert_close((q.grad, d.grad), expected, atol=1e-6, rtol=0)


def test_query_chunks_bound_the_scores_in_memory() -> None:
    """Only ``[chunk, batch]`` blocks of scores are kept for the backward pass, not the ``[batch, batch]`` matrix."""
    q, d = torch.randn(64, 8, requires_grad=True), torch.randn(64, 8, requires_grad=True)
    saved: list[torch.Size] = []

    def record(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
        MultipleNegativesRankingLoss(query_chunk_size=16)(q, d).backward()
    assert max(shape.numel() for shape in saved) <= 16 * 64
    with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
        MultipleNegativesRankingLoss(query_chunk_size=None)(q, d)
    assert max(shape.numel() for shape in saved) == 64 * 64
