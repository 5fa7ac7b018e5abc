"""The GradCache step gives the plain step's gradients while building graphs of one mini-batch at a time."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import compose_train, pair_collator, tiny_run_overrides, write_toy_data
from lightning.pytorch.plugins.precision import MixedPrecision
from safetensors.torch import load_file

from lit_embed.batch import Embedded, PackedTexts, PairBatch
from lit_embed.config import build
from lit_embed.losses.matryoshka import MatryoshkaLoss
from lit_embed.losses.mnrl import MultipleNegativesRankingLoss, mnrl
from lit_embed.models.encoder import Encoder
from lit_embed.train import run
from lit_embed.training.module import EmbeddingFinetuneModule
from lit_embed.training.steps import GradCache, mini_batches, plain_step, run_sizes, split_step

WORDS = "sort open parse join read format hash split merge count filter map reduce zip walk copy".split()


def collated_batch(encoder: Encoder, size: int = 12, negatives: int = 1, length_groups: int = 2) -> PairBatch:
    """``size`` pairs of varied lengths with ``negatives`` hard negatives each, collated as for training
    (``length_groups``: 0 packed, ``g`` padded in up to ``g`` groups)."""
    queries = [f"how to {' '.join(WORDS[i % 16 : i % 16 + 1 + i % 5])} {i}" for i in range(size)]
    documents = [f"def f{i}(): return {' + '.join(WORDS[: 1 + i % 9])}" for i in range(size * (1 + negatives))]
    rows = [(i, i, tuple(size + i * negatives + k for k in range(negatives))) for i in range(size)]
    return pair_collator(queries, documents, rows, encoder, length_groups)(list(range(size)))


def gradients(encoder: Encoder) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}


def plain_gradients(encoder: Encoder, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    encoder.zero_grad()
    loss = mnrl(Embedded(encoder(batch.queries), encoder(batch.documents)))
    loss.backward()
    return loss.detach(), gradients(encoder)


def cached_gradients(
    encoder: Encoder, batch: PairBatch, size: int, tokens: int | None = None, loss_scale: float = 1.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    encoder.zero_grad()
    step = GradCache(mini_batch_size=size, mini_batch_tokens=tokens)
    loss = step(encoder, batch, step.loss, loss_scale=loss_scale)
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
    batch = collated_batch(tiny_encoder, negatives=1, length_groups=0 if packed else 2)
    assert_same(cached_gradients(tiny_encoder, batch, 1, tokens), plain_gradients(tiny_encoder, batch))


@pytest.mark.parametrize("packed", [False, True])
def test_token_budget_bounds_every_graph_by_its_computed_tokens(
    tiny_encoder: Encoder, monkeypatch: pytest.MonkeyPatch, packed: bool
) -> None:
    """With ``mini_batch_tokens`` no forward pass that keeps a graph computes more tokens than that (padded: rows x
    the longest), unless it is one text longer than the budget; every text is encoded once."""
    computed: list[tuple[int, int]] = []  # (texts, tokens computed)
    forward = Encoder.forward

    def recording_forward(self, texts: PackedTexts):
        if torch.is_grad_enabled():
            assert self.packs(texts) is packed
            # Padded, at most texts x the longest: the encoder's length groups can only pad less.
            computed.append((len(texts), sum(texts.lengths) if packed else len(texts) * texts.max_length))
        return forward(self, texts)

    monkeypatch.setattr(Encoder, "forward", recording_forward)
    batch = collated_batch(tiny_encoder, size=40, negatives=1, length_groups=0 if packed else 2)
    longest = max(batch.queries.max_length, batch.documents.max_length)
    budget = 48
    assert longest < budget < 40 * longest  # a budget that cuts the batch
    step = GradCache(mini_batch_size=1, mini_batch_tokens=budget)
    step(tiny_encoder, batch, step.loss).backward()
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
    embedded = [
        torch.cat([tiny_encoder(chunk) for chunk in mini_batches(side, 4, None, tiny_encoder.packs(side))])
        for side in sides
    ]
    reference = mnrl(Embedded(*embedded))
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

    def recording_forward(self, texts: PackedTexts):
        if torch.is_grad_enabled():
            rows_with_graph.append(len(texts))
        return forward(self, texts)

    monkeypatch.setattr(Encoder, "forward", recording_forward)
    batch = collated_batch(tiny_encoder, size=40, negatives=1)
    step = GradCache(mini_batch_size=5)
    step(tiny_encoder, batch, step.loss).backward()
    assert max(rows_with_graph) <= 5
    assert sum(rows_with_graph) == 40 + 80  # every query and document once


def test_mini_batches_are_trimmed_to_their_longest_text(tiny_encoder: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    batch = collated_batch(tiny_encoder, size=12, negatives=0, length_groups=1)
    assert not tiny_encoder.packs(batch.documents)  # length_groups=1: padded, in one group per call
    chunks = mini_batches(batch.documents, 4, None, packs=False)
    assert [len(c) for c in chunks] == [4, 4, 4]
    masks = []
    embed_features = Encoder.embed_features

    def recording(self, features):
        masks.append(features["attention_mask"])
        return embed_features(self, features)

    monkeypatch.setattr(Encoder, "embed_features", recording)
    with torch.no_grad():
        tiny_encoder.eval()
        whole = tiny_encoder(batch.documents)
        masks.clear()
        pieces = torch.cat([tiny_encoder(c) for c in chunks])
    assert [mask.size(0) for mask in masks] == [4, 4, 4]
    for mask in masks:
        assert mask.bool().any(dim=0).all(), "a column of padding only was kept"
    torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=0)


def test_fp16s_loss_scale_gives_the_plain_gradients(tiny_encoder: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 trains with the cached step: its mini-batches back-propagate scaled (no fp16 underflow), and the
    gradients it hands on are the plain ones; the module passes it the scaler's current scale."""
    tiny_encoder.eval()
    batch = collated_batch(tiny_encoder, negatives=1)
    expected = plain_gradients(tiny_encoder, batch)
    assert_same(cached_gradients(tiny_encoder, batch, 3, loss_scale=1024.0), expected)

    module = EmbeddingFinetuneModule(tiny_encoder, loss=GradCache(mini_batch_size=3))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    module._trainer = SimpleNamespace(precision_plugin=MixedPrecision("16-mixed", "cpu", scaler=scaler))
    scales = []
    forward = GradCache.forward

    def recording(self, encoder, pairs, loss, loss_scale=1.0):
        scales.append(loss_scale)
        return forward(self, encoder, pairs, loss, loss_scale)

    monkeypatch.setattr(GradCache, "forward", recording)
    tiny_encoder.zero_grad()
    loss = module.task_loss(batch)
    loss.backward()
    assert scales == [1024.0]
    assert_same((loss.detach(), gradients(tiny_encoder)), expected)
    with pytest.raises(ValueError, match="mini_batch_size"):
        GradCache(mini_batch_size=0)
    with pytest.raises(ValueError, match="mini_batch_tokens"):
        GradCache(mini_batch_tokens=0)


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


def nested(inner: torch.nn.Module) -> MatryoshkaLoss:
    return MatryoshkaLoss(inner, dims=[64, 32, 16], weights=[1.0, 0.5, 0.25])


def test_matryoshka_and_the_cached_step_compose_either_way_round(tiny_encoder: Encoder) -> None:
    """GradCache around Matryoshka, and Matryoshka around GradCache (``loss=matryoshka`` with a GradCache as its
    ``loss:``): both split into the cached step and Matryoshka of the inner loss, with the plain step's loss and
    gradients."""
    tiny_encoder.eval()
    batch = collated_batch(tiny_encoder, negatives=1)
    tiny_encoder.zero_grad()
    loss = plain_step(tiny_encoder, batch, nested(MultipleNegativesRankingLoss()))
    loss.backward()
    expected = loss.detach(), gradients(tiny_encoder)
    for config in (
        GradCache(nested(MultipleNegativesRankingLoss()), mini_batch_size=3),
        nested(GradCache(MultipleNegativesRankingLoss(), mini_batch_size=3)),
    ):
        step, loss = split_step(config)
        assert isinstance(step, GradCache) and step.mini_batch_size == 3
        assert isinstance(loss, MatryoshkaLoss) and isinstance(loss.loss, MultipleNegativesRankingLoss)
        tiny_encoder.zero_grad()
        cached = step(tiny_encoder, batch, loss)
        cached.backward()
        assert_same((cached.detach(), gradients(tiny_encoder)), expected)

    module = EmbeddingFinetuneModule(tiny_encoder, nested(GradCache(MultipleNegativesRankingLoss(), mini_batch_size=3)))
    assert isinstance(module.steps[""], GradCache) and isinstance(module.loss.loss, MultipleNegativesRankingLoss)
    module._trainer = SimpleNamespace(precision_plugin=None)  # no fp16 scaler: loss scale 1
    tiny_encoder.zero_grad()
    cached = module.task_loss(batch)
    cached.backward()
    assert_same((cached.detach(), gradients(tiny_encoder)), expected)

    overrides = ["loss=matryoshka", "loss.loss._target_=lit_embed.training.steps.GradCache", "~loss.loss.scale"]
    step, loss = split_step(build(compose_train([*overrides, "+loss.loss.mini_batch_size=3"]).loss, "loss"))
    assert isinstance(step, GradCache) and step.mini_batch_size == 3
    assert isinstance(loss, MatryoshkaLoss) and isinstance(loss.loss, MultipleNegativesRankingLoss)
