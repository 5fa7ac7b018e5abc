"""The loss equals sentence-transformers' MultipleNegativesRankingLoss on the same embeddings."""

from __future__ import annotations

import pytest
import torch
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as STMNRL

from lit_embed.batch import Embedded
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
    ours = mnrl(Embedded(queries, torch.cat([positives, per_query_negatives.double()])), scale=20.0)
    assert ours.item() == pytest.approx(expected.item(), abs=1e-6)


def test_gradients_equal_sentence_transformers(st_loss: STMNRL) -> None:
    torch.manual_seed(0)
    q = torch.randn(8, 16, requires_grad=True)
    d = torch.randn(8, 16, requires_grad=True)
    st_loss.compute_loss_from_embeddings([q, d], labels=None).backward()
    expected = q.grad.clone(), d.grad.clone()
    q.grad = d.grad = None
    MultipleNegativesRankingLoss(scale=20.0)(Embedded(q, d)).backward()
    torch.testing.assert_close((q.grad, d.grad), expected, atol=1e-6, rtol=0)


def test_scale_changes_the_loss_and_must_be_positive() -> None:
    q, d = torch.randn(4, 8), torch.randn(4, 8)
    assert mnrl(Embedded(q, d), scale=20.0) != mnrl(Embedded(q, d), scale=1.0)
    with pytest.raises(ValueError, match="scale must be positive"):
        MultipleNegativesRankingLoss(scale=0)


def test_perfect_alignment_gives_low_loss() -> None:
    q = torch.eye(6)
    assert mnrl(Embedded(q, q.clone()), scale=20.0) < 1e-6
    with pytest.raises(ValueError, match="at least one positive per query"):
        mnrl(Embedded(torch.randn(4, 8), torch.randn(3, 8)))


@pytest.mark.parametrize("num_negatives", [0, 5])
def test_query_chunks_give_the_same_loss_and_gradients(num_negatives: int) -> None:
    torch.manual_seed(3)
    q = torch.randn(10, 16, requires_grad=True)
    d = torch.randn(10 + num_negatives, 16, requires_grad=True)
    mnrl(Embedded(q, d)).backward()
    expected = q.grad.clone(), d.grad.clone()
    q.grad = d.grad = None
    chunked = MultipleNegativesRankingLoss(query_chunk_size=3)
    loss = chunked(Embedded(q, d))
    loss.backward()
    assert loss.item() == pytest.approx(mnrl(Embedded(q, d)).item(), abs=1e-6)
    torch.testing.assert_close((q.grad, d.grad), expected, atol=1e-6, rtol=0)


def test_query_chunks_bound_the_scores_in_memory() -> None:
    """Only ``[chunk, batch]`` blocks of scores are kept for the backward pass, not the ``[batch, batch]`` matrix."""
    q, d = torch.randn(64, 8, requires_grad=True), torch.randn(64, 8, requires_grad=True)
    saved: list[torch.Size] = []

    def record(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
        MultipleNegativesRankingLoss(query_chunk_size=16)(Embedded(q, d)).backward()
    assert max(shape.numel() for shape in saved) <= 16 * 64
    with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
        MultipleNegativesRankingLoss(query_chunk_size=None)(Embedded(q, d))
    assert max(shape.numel() for shape in saved) == 64 * 64


DIRECTION_CASES = [
    (("query_to_doc", "doc_to_query"), "joint"),
    (("query_to_doc", "doc_to_query"), "per_direction"),
    (("query_to_doc", "query_to_query"), "joint"),
    (("query_to_doc", "doc_to_doc"), "joint"),
    (("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), "joint"),
]


def _st_and_ours_layout(batch: int, dim: int, columns: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """sentence-transformers' columns, and ours: positives, then each query's negatives, with their queries."""
    embeddings = [torch.randn(batch, dim, dtype=torch.float64) for _ in range(2 + columns)]
    negatives = torch.stack(embeddings[2:], dim=1).reshape(-1, dim) if columns else torch.empty(0, dim).double()
    documents = torch.cat([embeddings[1], negatives])
    rows = torch.cat([torch.arange(batch), torch.arange(batch).repeat_interleave(columns)])  # [B + B * columns]
    return embeddings, documents, rows


@pytest.mark.parametrize("num_negative_columns", [0, 2])
@pytest.mark.parametrize(("directions", "partition_mode"), DIRECTION_CASES)
def test_directions_equal_sentence_transformers(
    tiny_model_path: str, directions: tuple[str, ...], partition_mode: str, num_negative_columns: int
) -> None:
    from sentence_transformers import SentenceTransformer

    st = STMNRL(
        SentenceTransformer(tiny_model_path, device="cpu"), directions=directions, partition_mode=partition_mode
    )
    torch.manual_seed(len(directions) + num_negative_columns)
    embeddings, documents, rows = _st_and_ours_layout(10, 16, num_negative_columns)
    expected = st.compute_loss_from_embeddings(embeddings, labels=None)
    for chunk in (None, 3):
        loss = MultipleNegativesRankingLoss(
            query_chunk_size=chunk, directions=directions, partition_mode=partition_mode
        )
        ours = loss(Embedded(embeddings[0], documents, document_rows=rows))
        assert ours.item() == pytest.approx(expected.item(), abs=1e-6)


def test_directions_gradients_equal_sentence_transformers(st_loss: STMNRL) -> None:
    directions = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
    st = STMNRL(st_loss.model, directions=directions)
    torch.manual_seed(1)
    embeddings, documents, rows = _st_and_ours_layout(8, 16, 1)
    leaves = [e.clone().requires_grad_() for e in embeddings]
    st.compute_loss_from_embeddings(leaves, labels=None).backward()
    q, d = embeddings[0].clone().requires_grad_(), documents.clone().requires_grad_()
    loss = MultipleNegativesRankingLoss(directions=directions, query_chunk_size=3)
    loss(Embedded(q, d, document_rows=rows)).backward()
    expected_d = torch.cat([leaves[1].grad, leaves[2].grad])
    torch.testing.assert_close((q.grad, d.grad), (leaves[0].grad, expected_d), atol=1e-6, rtol=0)


def test_default_direction_is_the_classic_loss() -> None:
    torch.manual_seed(2)
    q, d = torch.randn(6, 8), torch.randn(9, 8)
    rows = torch.cat([torch.arange(6), torch.tensor([0, 1, 2])])
    assert mnrl(Embedded(q, d), directions=["query_to_doc"]) == mnrl(Embedded(q, d))
    assert MultipleNegativesRankingLoss()(Embedded(q, d, document_rows=rows)) == mnrl(Embedded(q, d))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"directions": ["doc_to_query"]}, "directions=\\['doc_to_query'\\] is not allowed: .*includes query_to_doc"),
        ({"directions": ["query_to_doc", "doc_to_dog"]}, "directions=.* is not allowed: a list of distinct"),
        ({"directions": "query_to_doc"}, "directions='query_to_doc' is not allowed"),
        ({"partition_mode": "split"}, "partition_mode='split' is not allowed: joint or per_direction"),
        (
            {"directions": ["query_to_doc", "doc_to_doc"], "partition_mode": "per_direction"},
            "partition_mode=.per_direction. is not allowed: joint with the directions",
        ),
    ],
)
def test_directions_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MultipleNegativesRankingLoss(**kwargs)
