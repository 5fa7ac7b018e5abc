"""The distillation losses equal sentence-transformers' MarginMSELoss and DistillKLDivLoss on the same embeddings."""

from __future__ import annotations

import json

import pytest
import torch
from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss, MarginMSELoss

from lit_embed.batch import PairBatch, TokenGroups
from lit_embed.data.datamodule import QAPairDataModule
from lit_embed.data.json_files import load_jsonl
from lit_embed.data.schema import SkipPolicy
from lit_embed.errors import DataFormatError, InvalidValueError, LitEmbedError
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


def scored_rows(n: int, k: int = 2) -> list[dict]:
    return [
        {
            "query": f"question {i}",
            "positive": f"answer {i}",
            "negatives": [f"wrong answer {i}.{j}" for j in range(k)],
            "scores": [5.0 + i, *(float(j - i) for j in range(k))],
        }
        for i in range(n)
    ]


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_scores_travel_from_the_file_to_the_batch(tmp_path, tiny_encoder) -> None:
    rows = scored_rows(6, k=3)
    rows[0]["negatives"][1] = " "  # an empty negative is skipped, and its score with it
    data = QAPairDataModule(str(write_jsonl(tmp_path / "s.jsonl", rows)), batch_size=3, max_negatives=2, max_skipped=1)
    data.prepare_data()
    assert data.has_teacher_scores
    assert data._examples[0].scores == (5.0, 0.0, 2.0)  # negatives 0 and 2 of row 0, trimmed to 2
    data.tokenize(tiny_encoder)
    batch = data.collator([3, 1, 4])
    assert batch.scores.tolist() == [[8.0, -3.0, -2.0], [6.0, -1.0, 0.0], [9.0, -4.0, -3.0]]
    texts = data.collator.documents.texts
    doc_rows = [p for _, p, _ in (data.collator.rows[i] for i in (3, 1, 4))]
    doc_rows += [n for i in (3, 1, 4) for n in data.collator.rows[i][2]]
    assert [[texts[doc_rows[c]] for c in row] for row in batch.candidates.tolist()][1] == [
        "answer 1",
        "wrong answer 1.0",
        "wrong answer 1.1",
    ]


def test_rows_with_different_numbers_of_negatives_are_refused_with_scores(tmp_path) -> None:
    rows = scored_rows(6, k=3)
    rows[2] = scored_rows(3, k=1)[2]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    with pytest.raises(DataFormatError, match=r"from 1 to 3 hard negatives.*data.max_negatives=1"):
        QAPairDataModule(str(path), batch_size=2).prepare_data()
    data = QAPairDataModule(str(path), batch_size=2, max_negatives=1)
    data.prepare_data()
    assert {len(e.scores) for e in data._examples} == {2}


def test_wrong_scores_are_a_file_error_and_nonfinite_ones_a_skipped_line(tmp_path) -> None:
    rows = scored_rows(4)
    rows[1]["scores"] = [1.0, 2.0]
    with pytest.raises(DataFormatError, match=r"line 2: \"scores\" must be a list of 3 numbers"):
        load_jsonl(write_jsonl(tmp_path / "short.jsonl", rows))
    rows[1]["scores"] = [1.0, "2", 3.0]
    with pytest.raises(DataFormatError, match="line 2"):
        load_jsonl(write_jsonl(tmp_path / "text.jsonl", rows))
    rows[1]["scores"] = [1.0, float("nan"), 3.0]
    path = write_jsonl(tmp_path / "nan.jsonl", rows)
    dataset = load_jsonl(path, SkipPolicy(max_skipped=1))
    assert len(dataset.queries) == 3 and dataset.skipped.ids == {"nonfinite_score": ["line 2"]}
    with pytest.raises(DataFormatError, match="line 2: the teacher scores .* not all finite"):
        load_jsonl(path, SkipPolicy(strict=True))


def test_a_distillation_run_on_data_without_scores_is_refused_before_training(tmp_path) -> None:
    from helpers import compose_train, tiny_run_overrides

    from lit_embed.train import run

    rows = [{k: v for k, v in r.items() if k != "scores"} for r in scored_rows(8)]
    path = write_jsonl(tmp_path / "plain.jsonl", rows)
    cfg = compose_train(tiny_run_overrides(path, None, tmp_path / "run", loss="margin_mse"))
    with pytest.raises(LitEmbedError, match="lit-embed-score"):
        run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
