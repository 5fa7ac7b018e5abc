"""loss=gist equals sentence-transformers' GISTEmbedLoss, caches its guide, and trains end to end."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import compose_train, pair_collator, tiny_run_overrides, write_toy_data
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss, gist_embed
from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss as ST_MatryoshkaLoss

from lit_embed.batch import Embedded, PairBatch
from lit_embed.errors import InvalidValueError, LitEmbedError
from lit_embed.losses.gist import GISTLoss, gist
from lit_embed.losses.matryoshka import MatryoshkaLoss
from lit_embed.models.encoder import Encoder
from lit_embed.train import run
from lit_embed.training.steps import GradCache


@pytest.fixture(scope="module")
def st_model(tiny_model_path: str) -> SentenceTransformer:
    return SentenceTransformer(tiny_model_path, device="cpu")


def st_gist_of_embeddings(
    st_model: SentenceTransformer,
    monkeypatch: pytest.MonkeyPatch,
    student: list[torch.Tensor],
    guide: list[torch.Tensor],
    **options: object,
) -> torch.Tensor:
    """sentence-transformers' loss on given embeddings: each column's features name its student and guide rows."""
    guide_model = SentenceTransformer(modules=list(st_model), device="cpu")  # a second model, the same tokenizer
    loss = GISTEmbedLoss(st_model, guide_model, **options)

    def embed_columns(model: SentenceTransformer, features: list[dict]) -> list[torch.Tensor]:
        return [(student if model is st_model else guide)[f["column"]] for f in features]

    monkeypatch.setattr(gist_embed, "embed_columns", embed_columns)
    return loss([{"column": i} for i in range(len(student))], labels=None)


@pytest.mark.parametrize("negatives", [False, True])
@pytest.mark.parametrize(("margin_strategy", "margin"), [("absolute", 0.0), ("absolute", 0.1), ("relative", 0.05)])
@pytest.mark.parametrize("contrast", [True, False])
def test_equals_sentence_transformers(
    st_model: SentenceTransformer,
    monkeypatch: pytest.MonkeyPatch,
    negatives: bool,
    margin_strategy: str,
    margin: float,
    contrast: bool,
) -> None:
    torch.manual_seed(7)
    batch, dim, guide_dim = 16, 8, 6  # few dimensions, so the guide finds some candidates above the positive
    columns = 3 if negatives else 2
    student = [torch.randn(batch, dim, dtype=torch.float64) for _ in range(columns)]
    guide = [torch.randn(batch, guide_dim, dtype=torch.float64) for _ in range(columns)]
    guide[1] = guide[0] + 0.8 * guide[1]  # positives the guide scores high, as a real guide would
    options = dict(
        temperature=0.05,
        margin_strategy=margin_strategy,
        margin=margin,
        contrast_anchors=contrast,
        contrast_positives=contrast,
    )
    expected = st_gist_of_embeddings(st_model, monkeypatch, student, guide, **options)
    # Ours takes the documents as one list: the positives, then the hard negatives (one per query here).
    loss, masked = gist(student[0], torch.cat(student[1:]), guide[0], torch.cat(guide[1:]), **options)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert masked > 0  # the case is one where the guide drops candidates


def test_a_dropped_candidate_is_counted_and_left_out() -> None:
    """A candidate the guide scores above the positive leaves that query's softmax, and only that query's."""
    torch.manual_seed(0)
    queries, documents = torch.randn(3, 4), torch.randn(4, 4)  # 3 positives, 1 hard negative
    guide_queries = torch.eye(3, 4)
    guide_documents = torch.tensor([[0.9, 0.1, 0, 0], [0, 0.9, 0.1, 0], [0, 0, 0.9, 0.1], [1.0, 0, 0, 0]])
    loss, masked = gist(
        queries, documents, guide_queries, guide_documents, contrast_anchors=False, contrast_positives=False
    )
    assert masked.item() == 1  # query 0's guide scores the negative (1.0) above its positive (0.99)
    scores = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(documents, dim=-1).T
    scores[0, 3] = -torch.inf
    expected = torch.nn.functional.cross_entropy(scores / 0.05, torch.arange(3))  # the default temperature
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("margin_strategy", "loose", "absolute"),
        ("margin", -0.1, "margin"),
        ("temperature", 0, "positive"),
        ("contrast_anchors", "yes", "true or false"),
        ("guide", "", "model path"),
    ],
)
def test_bad_values_are_refused(key: str, value: object, message: str) -> None:
    with pytest.raises(InvalidValueError, match=message):
        GISTLoss(**{key: value})


def collated(encoder: Encoder, size: int = 6, negatives: int = 1):
    queries = [f"how to sort list number {i}" for i in range(size)]
    documents = [f"def sort_{i}(xs): return sorted(xs) + [{i}]" for i in range(size * (1 + negatives))]
    rows = [(i, i, tuple(size + i * negatives + k for k in range(negatives))) for i in range(size)]
    return pair_collator(queries, documents, rows, encoder, 2)(list(range(size)))


def prepared(loss: GISTLoss, encoder: Encoder, batch: PairBatch) -> GISTLoss:
    """The loss after what the module does before training: its guide loaded, the batch's texts embedded."""
    loss.prepare(encoder, {"query": batch.queries.texts, "document": batch.documents.texts})
    return loss


@pytest.mark.parametrize("negatives", [0, 1])
def test_batch_loss_equals_sentence_transformers_on_the_model(
    tiny_model_path: str, st_model: SentenceTransformer, negatives: int
) -> None:
    """Same model, guide (the base model) and batch: the same loss as GISTEmbedLoss, which embeds them itself.

    The student runs in float64: the two compute the same sums in other orders, which in float32 differ by up to
    2e-6 on some CPUs (each about as far from the float64 value), so float32 cannot show they are the same."""
    encoder = Encoder(tiny_model_path).eval().double()  # dropout off, so both embed alike
    batch = collated(encoder, negatives=negatives)
    ours = prepared(GISTLoss(temperature=0.05, margin=0.01, cache_dir=None), encoder, batch)
    loss = ours(batch.embed(encoder))
    guide = SentenceTransformer(tiny_model_path, device="cpu")
    theirs = GISTEmbedLoss(encoder.model, guide, temperature=0.05, margin=0.01)
    size = len(batch)
    columns = [batch.queries.texts] + [
        batch.documents.texts[start : start + size] for start in range(0, len(batch.documents), size)
    ]
    expected = theirs([encoder.model.preprocess(texts) for texts in columns], labels=None)
    assert loss.dtype == torch.float64 and loss.item() == pytest.approx(expected.item(), abs=1e-9)


def test_matryoshka_of_gist_equals_sentence_transformers_on_the_model(
    tiny_model_path: str, st_model: SentenceTransformer
) -> None:
    """loss=matryoshka with loss.loss=gist: each prefix of the student against the guide's whole embeddings."""
    encoder = Encoder(tiny_model_path).eval()
    batch = collated(encoder, negatives=1)
    dims = [encoder.embedding_dim, 16, 8]
    inner = prepared(GISTLoss(temperature=0.05, margin=0.01, cache_dir=None), encoder, batch)
    ours = MatryoshkaLoss(inner, dims)(batch.embed(encoder))
    guide = SentenceTransformer(tiny_model_path, device="cpu")
    theirs = ST_MatryoshkaLoss(encoder.model, GISTEmbedLoss(encoder.model, guide, temperature=0.05, margin=0.01), dims)
    size = len(batch)
    columns = [batch.queries.texts, batch.documents.texts[:size], batch.documents.texts[size:]]
    expected = theirs([encoder.model.preprocess(texts) for texts in columns], labels=None)
    assert ours.item() == pytest.approx(expected.item(), abs=1e-6)


def test_guide_is_frozen_unsaved_and_embeds_each_text_once(tiny_model_path: str) -> None:
    encoder = Encoder(tiny_model_path)
    batch = collated(encoder)
    loss = GISTLoss(cache_dir=None)
    loss.prepare(encoder, {})  # the guide loaded, no text prepared: each is embedded at its first batch
    calls = []
    loss(batch.embed(encoder))
    guide = loss.guide(encoder)
    guide.register_forward_hook(lambda *args: calls.append(1))
    first_state = {k: v.clone() for k, v in guide.state_dict().items()}
    with torch.no_grad():
        next(encoder.parameters()).add_(1.0)  # the student trains; the guide must not follow
    loss(batch.embed(encoder))  # every text is in the cache: the guide does not run
    assert calls == []
    assert list(loss.state_dict()) == [] and not any(p.requires_grad for p in guide.parameters())
    assert all(torch.equal(v, first_state[k]) for k, v in guide.state_dict().items())
    assert not guide.training
    assert loss.step_metrics()["gist_masked"].dtype == torch.long


def test_prepare_embeds_every_training_text_once_and_a_later_run_reads_them_from_disk(
    tmp_path: Path, tiny_model_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = Encoder(tiny_model_path).eval()
    batch = collated(encoder)
    texts = {"query": batch.queries.texts, "document": batch.documents.texts}
    first = GISTLoss(margin=0.01, cache_dir=tmp_path / "cache")
    first.prepare(encoder, texts)
    expected = first(batch.embed(encoder))
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()) == ["document", "query"]

    def no_guide_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the guide ran again")

    # A new run (a new loss, the guide loaded anew) on the same texts: every embedding comes from disk.
    later = GISTLoss(margin=0.01, cache_dir=tmp_path / "cache")
    later.guide(encoder)
    monkeypatch.setattr(Encoder, "encode", no_guide_run)
    monkeypatch.setattr(Encoder, "forward", no_guide_run)
    later.prepare(encoder, texts)
    monkeypatch.undo()
    later.guide(encoder).register_forward_hook(no_guide_run)  # training embeds with the student only
    assert later(batch.embed(encoder)).item() == pytest.approx(expected.item(), abs=1e-6)
    assert later.step_metrics()["gist_masked"] == first.step_metrics()["gist_masked"]


def test_a_run_prepares_the_guide_before_the_first_step(tmp_path: Path) -> None:
    """``train.py loss=gist``: the guide embeds the training texts once, saved in loss.cache_dir, before training."""
    train, _ = write_toy_data(tmp_path)
    overrides = tiny_run_overrides(train, None, tmp_path / "run", **{"trainer.max_steps": 2})
    run(compose_train([*overrides, "loss=gist", f"loss.cache_dir={tmp_path / 'cache'}"]))
    saved = {
        p.name.split("-")[0]: torch.load(p, weights_only=True)["embeddings"] for p in (tmp_path / "cache").iterdir()
    }
    assert {kind: vectors.size(0) for kind, vectors in saved.items()} == {"query": 48, "document": 48}  # the toy set's


def test_any_embeddings_of_the_batch_are_scored_against_the_guides_view_of_its_texts(tiny_model_path: str) -> None:
    """The loss is a function of embeddings with the batch's texts: whoever made the embeddings (a step, a wrapper
    that cut them), the guide embeds the batch's texts, and the loss is :func:`gist` of the two."""
    encoder = Encoder(tiny_model_path).eval()
    batch = collated(encoder, negatives=1)
    loss = prepared(GISTLoss(margin=0.01, cache_dir=None), encoder, batch)
    torch.manual_seed(0)
    queries, documents = torch.randn(len(batch), 12), torch.randn(len(batch.documents), 12)
    guide = loss.guide(encoder)
    guide_queries = guide.encode(batch.queries.texts, "query")
    guide_documents = guide.encode(batch.documents.texts, "document")
    expected, masked = gist(queries, documents, guide_queries, guide_documents, margin=0.01)
    assert loss(batch.embedded(queries, documents)).item() == pytest.approx(expected.item(), abs=1e-6)
    assert loss.step_metrics()["gist_masked"] == masked
    with pytest.raises(LitEmbedError, match="needs the batch's texts for its guide"):
        loss(Embedded(queries, documents))  # no batch, no texts: nothing for the guide to embed


def test_cached_gist_equals_gist(tiny_model_path: str) -> None:
    encoder = Encoder(tiny_model_path).eval()
    batch = collated(encoder, size=8)
    plain = prepared(GISTLoss(margin=0.01, cache_dir=None), encoder, batch)
    expected = plain(batch.embed(encoder))
    expected.backward()
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    encoder.zero_grad()
    inner = prepared(GISTLoss(margin=0.01, cache_dir=None), encoder, batch)
    loss = GradCache(inner, mini_batch_size=3)(encoder, batch, inner)
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(encoder.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4)
    assert inner.step_metrics()["gist_masked"] == plain.step_metrics()["gist_masked"]


@pytest.mark.parametrize("loss", ["gist", "cached_gist"])
def test_tiny_run_logs_masked_candidates_and_exports(tmp_path: Path, loss: str) -> None:
    train, _ = write_toy_data(tmp_path)
    out = tmp_path / "run"
    overrides = tiny_run_overrides(train, None, out, **{"trainer.max_steps": 2})
    cache = "loss.loss.cache_dir" if loss == "cached_gist" else "loss.cache_dir"
    run(compose_train([*overrides, f"loss={loss}", "logger=csv", f"{cache}={tmp_path / 'cache'}"]))
    assert (out / "model" / "modules.json").is_file()
    rows = list(csv.DictReader((out / "logs" / "version_0" / "metrics.csv").open()))
    masked = [float(row["train/gist_masked"]) for row in rows if row.get("train/gist_masked")]
    assert len(masked) == 2 and all(count >= 0 for count in masked)
    print(f"{loss}: train/gist_masked per step = {masked}")


def test_several_positives_per_query_are_refused(tiny_model_path: str) -> None:
    encoder = Encoder(tiny_model_path)
    batch = collated(encoder)
    several = replace(batch, positives=torch.ones(len(batch.documents), dtype=torch.bool))
    with pytest.raises(LitEmbedError, match="data.multi_positive=false"):
        GISTLoss()(several.embed(encoder))
