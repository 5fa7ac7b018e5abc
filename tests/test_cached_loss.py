"""The cached (GradCache) loss gives the plain loss's gradients while building graphs of one mini-batch at a time."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import compose_train, pair_collator, tiny_run_overrides, write_toy_data
from safetensors.torch import load_file

from lit_embed.batch import PackedTexts, PairBatch
from lit_embed.errors import LitEmbedError
from lit_embed.losses.cached import CachedLoss, mini_batches, run_sizes
from lit_embed.losses.matryoshka import MatryoshkaLoss
from lit_embed.losses.mnrl import MultipleNegativesRankingLoss, mnrl
from lit_embed.models.encoder import Encoder
from lit_embed.train import run
from lit_embed.training.module import EmbeddingFinetuneModule

WORDS = "sort open parse join read format hash split merge count filter map reduce zip walk copy".split()


def collated_batch(
    encoder: Encoder, size: int = 12, negatives: int = 1, length_groups: int = 2, packed: bool = False
) -> PairBatch:
    """``size`` pairs of varied lengths with ``negatives`` hard negatives each, collated as for training."""
    queries = [f"how to {' '.join(WORDS[i % 16 : i % 16 + 1 + i % 5])} {i}" for i in range(size)]
    documents = [f"def f{i}(): return {' + '.join(WORDS[: 1 + i % 9])}" for i in range(size * (1 + negatives))]
    rows = [(i, i, tuple(size + i * negatives + k for k in range(negatives))) for i in range(size)]
    return pair_collator(queries, documents, rows, encoder, length_groups, packed)(list(range(size)))


def gradients(encoder: Encoder) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}


def plain_gradients(encoder: Encoder, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    encoder.zero_grad()
    loss = mnrl(batch.queries.embed(encoder), batch.documents.embed(encoder))
    loss.backward()
    return loss.detach(), gradients(encoder)


def cached_gradients(
    encoder: Encoder, batch: PairBatch, size: int, tokens: int | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    encoder.zero_grad()
    loss = CachedLoss(mini_batch_size=size, mini_batch_tokens=tokens).batch_loss(encoder, batch)
    loss.backward()
    return loss.detach(), gradients(encoder)


def assert_same(actual: tuple, expected: tuple, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual[0], expected[0], atol=atol, rtol=0)
    assert actual[1].keys() == expected[1].keys()
    for name, grad in expected[1].items():
        torch.testing.assert_close(actual[1][name], grad, atol=atol, rtol=1e-3, msg=name)


@pytest.mark.parametrize("negatives", [0, 2])
@pytest.mark.parametrize("mini_batch_size", [1, 3, 64])
def test_gradients_equal_the_plain_loss(tiny_encoder: Encoder, negatives: int, mini_batch_size: int) -> None:
    tiny_encoder.eval()  # no dropout: the plain and cached passes see the same network
    batch = collated_batch(tiny_encoder, negatives=negatives)
    assert_same(cached_gradients(tiny_encoder, batch, mini_batch_size), plain_gradients(tiny_encoder, batch))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("tokens", [1, 40, 10_000])
def test_token_budget_mini_batches_give_the_plain_gradients(tiny_encoder: Encoder, packed: bool, tokens: int) -> None:
    tiny_encoder.eval()
    batch = collated_batch(tiny_encoder, negatives=1, packed=packed)
    assert_same(cached_gradients(tiny_encoder, batch, 1, tokens), plain_gradients(tiny_encoder, batch))


@pytest.mark.parametrize("packed", [False, True])
def test_token_budget_bounds_every_graph_by_its_computed_tokens(
    tiny_encoder: Encoder, monkeypatch: pytest.MonkeyPatch, packed: bool
) -> None:
    """With ``mini_batch_tokens`` no forward pass that keeps a graph computes more tokens than that (padded: rows x
    the longest), unless it is one text longer than the budget; every text is encoded once."""
    computed: list[tuple[int, int]] = []  # (texts, tokens computed)
    forward = Encoder.forward

    def recording_forward(self, features):
        if torch.is_grad_enabled():
            if isinstance(features, PackedTexts):
                computed.append((len(features), features.input_ids.size(1)))
            else:
                rows, columns = features["input_ids"].shape
                computed.append((rows, rows * columns))
        return forward(self, features)

    monkeypatch.setattr(Encoder, "forward", recording_forward)
    batch = collated_batch(tiny_encoder, size=40, negatives=1, packed=packed)
    longest = max(
        max(group.lengths) if packed else group["attention_mask"].sum(1).max().item()
        for side in (batch.queries, batch.documents)
        for group in side.groups
    )
    budget = 48
    assert longest < budget < 40 * longest  # a budget that cuts the batch
    CachedLoss(mini_batch_size=1, mini_batch_tokens=budget).batch_loss(tiny_encoder, batch).backward()
    assert max(tokens for _, tokens in computed) <= budget
    assert max(texts for texts, _ in computed) > 1  # cut by tokens, not by mini_batch_size
    assert sum(texts for texts, _ in computed) == 40 + 80


def test_run_sizes_cut_by_texts_or_by_computed_tokens() -> None:
    assert run_sizes([5, 5, 5, 5, 5], 2, None, padded=False) == [2, 2, 1]
    assert run_sizes([3, 4, 9, 2, 2, 1], 1, 10, padded=False) == [2, 1, 3]  # sums 7, 9, 5
    assert run_sizes([3, 4, 9, 2, 2, 1], 1, 10, padded=True) == [2, 1, 3]  # 2 x 4, 1 x 9, 3 x 2
    assert run_sizes([2, 2, 2, 6], 1, 10, padded=True) == [3, 1]  # 4 x 6 > 10
    assert run_sizes([20, 3, 30], 1, 10, padded=False) == [1, 1, 1]  # longer than the budget: alone
    assert run_sizes([], 4, 10, padded=False) == []


def test_dropout_masks_are_replayed(tiny_encoder: Encoder) -> None:
    """With dropout on, the re-encoded mini-batches must draw the masks of the first pass (else the gradient is of
    another network than the loss): equal to a plain pass over the same mini-batches from the same RNG state."""
    tiny_encoder.train()
    batch = collated_batch(tiny_encoder, negatives=1)
    torch.manual_seed(7)
    tiny_encoder.zero_grad()
    sides = [batch.queries, batch.documents]
    embedded = [torch.cat([tiny_encoder(chunk) for chunk in mini_batches(side, 4)])[side.order] for side in sides]
    reference = mnrl(*embedded)
    reference.backward()
    expected = reference.detach(), gradients(tiny_encoder)
    torch.manual_seed(7)
    assert_same(cached_gradients(tiny_encoder, batch, 4), expected)


def test_composes_with_bf16_autocast(tiny_encoder: Encoder) -> None:
    tiny_encoder.eval()
    batch = collated_batch(tiny_encoder, negatives=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = plain_gradients(tiny_encoder, batch)
        cached = cached_gradients(tiny_encoder, batch, 3)
    assert all(g.dtype == torch.float32 for g in cached[1].values())
    assert_same(cached, plain, atol=2e-2)


def test_graphs_are_built_one_mini_batch_at_a_time(tiny_encoder: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    """What bounds the memory: no forward pass that keeps a graph sees more than ``mini_batch_size`` texts."""
    rows_with_graph = []
    forward = Encoder.forward

    def recording_forward(self, features):
        if torch.is_grad_enabled():
            rows_with_graph.append(features["input_ids"].size(0))
        return forward(self, features)

    monkeypatch.setattr(Encoder, "forward", recording_forward)
    batch = collated_batch(tiny_encoder, size=40, negatives=1)
    CachedLoss(mini_batch_size=5).batch_loss(tiny_encoder, batch).backward()
    assert max(rows_with_graph) <= 5
    assert sum(rows_with_graph) == 40 + 80  # every query and document once


def test_mini_batches_are_trimmed_to_their_longest_text(tiny_encoder: Encoder) -> None:
    batch = collated_batch(tiny_encoder, size=12, negatives=0, length_groups=1)
    chunks = mini_batches(batch.documents, 4)
    assert [c["input_ids"].size(0) for c in chunks] == [4, 4, 4]
    for chunk in chunks:
        assert chunk["attention_mask"][:, -1].any(), "a column of padding only was kept"
    with torch.no_grad():
        tiny_encoder.eval()
        whole = batch.documents.embed(tiny_encoder)
        pieces = torch.cat([tiny_encoder(c) for c in chunks])[batch.documents.order]
    torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=0)


def test_fp16_is_refused_with_the_fix(tiny_encoder: Encoder) -> None:
    module = EmbeddingFinetuneModule(tiny_encoder, loss=CachedLoss())
    module._trainer = SimpleNamespace(precision="16-mixed")
    with pytest.raises(LitEmbedError, match="bf16-mixed or 32-true"):
        module.setup("fit")
    with pytest.raises(ValueError, match="mini_batch_size"):
        CachedLoss(mini_batch_size=0)
    with pytest.raises(ValueError, match="mini_batch_tokens"):
        CachedLoss(mini_batch_tokens=0)


@pytest.mark.parametrize("budget", ["loss.mini_batch_size=5", "loss.mini_batch_tokens=64"])
def test_cached_training_run_trains_the_model(tmp_path: Path, budget: str) -> None:
    train, val = write_toy_data(tmp_path)
    key, value = budget.split("=")
    settings = {
        "data.batch_size": 24,
        key: value,
        "load_best_model_at_end": "false",
        "trainer.max_epochs": 2,
    }
    metrics = run(compose_train([*tiny_run_overrides(train, val, tmp_path / "run", **settings), "loss=cached_mnrl"]))
    assert metrics["final"]["step"] == 4
    base = load_file(tmp_path / "run" / "base_model" / "model.safetensors")
    trained = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert any(not torch.equal(trained[k], base[k]) for k in base)


def test_wraps_matryoshka_and_not_the_other_way_round(tiny_encoder: Encoder) -> None:
    tiny_encoder.eval()
    batch = collated_batch(tiny_encoder, negatives=1)
    nested = MatryoshkaLoss(MultipleNegativesRankingLoss(), dims=[64, 32, 16], weights=[1.0, 0.5, 0.25])
    tiny_encoder.zero_grad()
    loss = nested(batch.queries.embed(tiny_encoder), batch.documents.embed(tiny_encoder))
    loss.backward()
    expected = loss.detach(), gradients(tiny_encoder)
    tiny_encoder.zero_grad()
    cached = CachedLoss(nested, mini_batch_size=3).batch_loss(tiny_encoder, batch)
    cached.backward()
    assert_same((cached.detach(), gradients(tiny_encoder)), expected)
    with pytest.raises(LitEmbedError, match="put it inside"):
        MatryoshkaLoss(CachedLoss(), dims=[16])
