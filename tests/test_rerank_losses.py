"""The reranker's losses equal sentence-transformers' CrossEncoder losses of the same name: the same tiny
cross-encoder scores the same (query, document) pairs, once inside sentence-transformers' loss and once into the
``[B, C]`` grid lit_embed's loss takes; the losses and the gradients they give every weight agree to 1e-6."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from sentence_transformers.cross_encoder import CrossEncoder
from sentence_transformers.cross_encoder import losses as st_losses

from lit_embed.losses import rerank
from lit_embed.models.tiny import build_tiny_cross_encoder

QUERIES = ["how do I sort a list", "open a file for reading", "parse a json string"]
# Each query's positive, then its hard negatives (the last query has one fewer: a padded row).
CANDIDATES = [
    ["sorted(items) returns a new list", "open(path) returns a file", "json.loads(text) parses"],
    ["open(path, 'r') reads a file", "list.sort() sorts in place", "os.remove deletes a file"],
    ["json.loads(s) turns text into objects", "csv.reader reads rows"],
]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> CrossEncoder:
    path = build_tiny_cross_encoder(tmp_path_factory.mktemp("ce") / "model", hidden_size=32, seed=5)
    model = CrossEncoder(path, device="cpu", activation_fn=torch.nn.Identity())
    model.eval()  # no dropout: both passes score the pairs alike
    return model


def grid(model: CrossEncoder, candidates: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits of every (query, candidate) pair as lit_embed's losses take them, and the mask."""
    width = max(map(len, candidates))
    pairs = [(QUERIES[i], doc) for i, row in enumerate(candidates) for doc in row]
    logits = model(model.preprocess(pairs))["scores"].view(-1)
    mask = torch.tensor([[c < len(row) for c in range(width)] for row in candidates])
    return torch.zeros(mask.shape).masked_scatter(mask, logits), mask


def gradients_of(model: CrossEncoder, loss: Callable[[], torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    value = loss()
    value.backward()
    return value.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def assert_same(model: CrossEncoder, reference: Callable[[], torch.Tensor], ours: Callable[[], torch.Tensor]) -> None:
    expected, expected_grads = gradients_of(model, reference)
    actual, grads = gradients_of(model, ours)
    assert actual == pytest.approx(expected, abs=1e-6)
    assert len(grads) == len(expected_grads) > 0
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def full_rows() -> list[list[str]]:
    return [row[:2] for row in CANDIDATES]  # sentence-transformers' column losses need equal rows


def test_binary_cross_entropy(model: CrossEncoder) -> None:
    pairs = [(QUERIES[i], doc) for i, row in enumerate(CANDIDATES) for doc in row]
    labels = torch.tensor([float(c == 0) for row in CANDIDATES for c in range(len(row))])
    reference = st_losses.BinaryCrossEntropyLoss(model, pos_weight=torch.tensor(2.0))

    def ours() -> torch.Tensor:
        logits, mask = grid(model, CANDIDATES)  # padded: the mask leaves the missing candidate out
        return rerank.binary_cross_entropy(logits, mask, pos_weight=2.0)

    assert_same(model, lambda: reference([[q for q, _ in pairs], [d for _, d in pairs]], labels), ours)


def test_in_batch_mnrl(model: CrossEncoder) -> None:
    """Every other query's documents as negatives, beside the query's own hard negative (num_negatives=None)."""
    rows = full_rows()
    reference = st_losses.MultipleNegativesRankingLoss(model, num_negatives=None)
    columns = [QUERIES, [r[0] for r in rows], [r[1] for r in rows]]
    others = [[doc for j, row in enumerate(rows) if j != i for doc in row] for i in range(len(rows))]

    def ours() -> torch.Tensor:
        logits, mask = grid(model, [row + other for row, other in zip(rows, others, strict=True)])
        return rerank.listwise_cross_entropy(logits, mask)

    assert_same(model, lambda: reference(columns, torch.ones(len(rows))), ours)


def test_listwise_cross_entropy_over_each_querys_own_candidates(model: CrossEncoder) -> None:
    """No in-batch negatives: sentence-transformers' MNRL on one query at a time is cross-entropy over its list."""

    def reference() -> torch.Tensor:
        loss = st_losses.MultipleNegativesRankingLoss(model, num_negatives=None)
        one_at_a_time = zip(QUERIES, CANDIDATES, strict=True)
        return sum(loss([[query], *[[doc] for doc in row]], torch.ones(1)) for query, row in one_at_a_time) / 3

    def ours() -> torch.Tensor:
        logits, mask = grid(model, CANDIDATES)
        return rerank.listwise_cross_entropy(logits, mask)

    assert_same(model, reference, ours)


def test_margin_mse(model: CrossEncoder) -> None:
    rows = CANDIDATES[:2]  # two negatives each: sentence-transformers takes equal rows
    teacher = torch.tensor([[4.0, 1.5, -2.0], [3.0, 2.5, 0.5]])
    reference = st_losses.MarginMSELoss(model)
    columns = [QUERIES[:2], *[[r[c] for r in rows] for c in range(3)]]

    def ours() -> torch.Tensor:
        logits, mask = grid(model, rows)
        return rerank.margin_mse(logits, teacher, mask)

    assert_same(model, lambda: reference(columns, teacher), ours)


@pytest.mark.parametrize("k", [None, 1])
def test_lambda_loss(model: CrossEncoder, k: int | None) -> None:
    """Graded labels, rows of different lengths (padded), and the top-k cut."""
    labels = [torch.tensor([2.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 0.0])]
    reference = st_losses.LambdaLoss(model, k=k)
    padded = torch.zeros(3, 3)
    for i, row in enumerate(labels):
        padded[i, : len(row)] = row

    def ours() -> torch.Tensor:
        logits, mask = grid(model, CANDIDATES)
        return rerank.lambda_loss(logits, padded, mask, k=k)

    assert_same(model, lambda: reference([QUERIES, CANDIDATES], labels), ours)
