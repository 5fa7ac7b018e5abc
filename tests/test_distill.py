"""The distillation losses equal sentence-transformers' MarginMSELoss and DistillKLDivLoss on the same embeddings."""

from __future__ import annotations

import json

import pytest
import torch
from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss, MarginMSELoss

from lit_embed.batch import Embedded, PackedTexts, PairBatch
from lit_embed.data.datamodule import QAPairDataModule
from lit_embed.data.json_files import load_jsonl
from lit_embed.data.schema import SkipPolicy
from lit_embed.errors import DataFormatError, InvalidValueError, LitEmbedError
from lit_embed.losses.distill import KLDistillLoss, check_distillation_data, kl_distill, margin_mse
from lit_embed.losses.distill import MarginMSELoss as OurMarginMSE
from lit_embed.losses.matryoshka import MatryoshkaLoss
from lit_embed.training.steps import plain_step


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
    """Our loss on sentence-transformers' columns, laid out as a batch: the positives, then each query's negatives,
    with ``candidates`` naming each query's own rows."""
    queries, positives, *negatives = embeddings
    size, k = queries.size(0), len(negatives)
    documents = torch.cat([positives, torch.stack(negatives, dim=1).flatten(0, 1)])  # [B + B * k, D]
    rows = torch.arange(size)[:, None]
    candidates = torch.cat([rows, size + rows * k + torch.arange(k)], dim=1)  # [B, 1 + k]
    return loss(Embedded(queries, documents, scores=scores, candidates=candidates))


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


def table_sides(size: int, documents: int) -> tuple[PackedTexts, PackedTexts]:
    """A batch's two sides as one-token texts whose token ids are rows of one table: queries ``0 .. size - 1``,
    then documents, so a table lookup is an encoder (the sides join into one call, as real ones do)."""
    queries = PackedTexts.from_tokens(torch.arange(size), [1] * size)
    docs = PackedTexts.from_tokens(torch.arange(size, size + documents), [1] * documents)
    return queries, docs


def kl_at(temperature: float):
    """kl_distill at ``temperature``, called as margin_mse is: ``(queries, candidates, teacher_scores, mask)``."""
    return lambda queries, candidates, scores, mask=None: kl_distill(queries, candidates, scores, temperature, mask)


def test_batch_loss_takes_each_querys_own_candidates() -> None:
    """The candidates index the batch's documents: positives first, then each row's negatives."""
    torch.manual_seed(0)
    queries, documents = torch.randn(3, 8), torch.randn(3 + 6, 8)
    candidates = torch.tensor([[0, 3, 4], [1, 5, 6], [2, 7, 8]])
    scores = torch.randn(3, 3)
    batch = PairBatch(*table_sides(3, 9), scores=scores, candidates=candidates)
    table = torch.cat([queries, documents])
    encoder = lambda packed: table[packed.input_ids[0]]  # noqa: E731
    for loss, function in ((OurMarginMSE(), margin_mse), (KLDistillLoss(0.5), kl_at(0.5))):
        assert loss(batch.embed(encoder)) == function(queries, documents[candidates], scores)


def test_refuses_a_batch_without_scores() -> None:
    embedded = Embedded(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(LitEmbedError, match="lit-embed-score"):
        OurMarginMSE()(embedded)
    with pytest.raises(LitEmbedError, match="lit-embed-score"):
        MatryoshkaLoss(KLDistillLoss(), dims=[4])(embedded)
    with pytest.raises(InvalidValueError, match="temperature"):
        KLDistillLoss(temperature=0)


def padded_batch(counts: list[int], dim: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, ``[B, 1 + k_max, D]`` candidates and ``[B, 1 + k_max]`` scores, rows padded as the collator pads
    them (NaN scores), and the mask of real candidates; padded slots hold embeddings that must not count."""
    torch.manual_seed(sum(counts))
    size, width = len(counts), 1 + max(counts)
    queries = torch.randn(size, dim, dtype=torch.float64)
    candidates = torch.randn(size, width, dim, dtype=torch.float64) * 2
    mask = torch.arange(width) <= torch.tensor(counts)[:, None]  # [B, 1 + k_max]
    scores = (torch.randn(size, width, dtype=torch.float64) * 3).masked_fill(~mask, torch.nan)
    return queries, candidates, scores, mask


def padded_embedded(queries: torch.Tensor, candidates: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor):
    """The padded candidates as a batch's documents, each row's real ones named by ``candidates`` (-1: padding)."""
    size, width, dim = candidates.shape
    rows = torch.arange(size * width).view(size, width).masked_fill(~mask, -1)  # [B, 1 + k_max]
    return Embedded(queries, candidates.reshape(-1, dim), scores=scores, candidates=rows)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_masked_losses_equal_the_losses_of_each_rows_own_candidates(temperature: float) -> None:
    """Padding changes nothing: the mean over every row's real margins, the mean over rows of each row's KL."""
    counts = [3, 0, 1, 2, 3]
    queries, candidates, scores, mask = padded_batch(counts)
    queries.requires_grad_()
    errors, kls = [], []
    for i, k in enumerate(counts):
        student = candidates[i, : 1 + k] @ queries[i]  # [1 + k] this row alone, unpadded
        teacher = scores[i, : 1 + k]
        errors.append(((student[0] - student[1:]) - (teacher[0] - teacher[1:])) ** 2)  # [k]
        teacher_probs = torch.softmax(teacher / temperature, dim=0)
        log_ratio = teacher_probs.log() - torch.log_softmax(student / temperature, dim=0)
        kls.append((teacher_probs * log_ratio).sum() * temperature**2)
    expected = {
        "margin_mse": (torch.cat(errors).mean(), margin_mse, OurMarginMSE()),
        "kl_distill": (torch.stack(kls).mean(), kl_at(temperature), KLDistillLoss(temperature)),
    }
    embedded = padded_embedded(queries, candidates, scores, mask)
    for name, (reference, function, loss) in expected.items():
        (expected_grad,) = torch.autograd.grad(reference, queries, retain_graph=True)  # both share the student
        for value in (function(queries, candidates, scores, mask), loss(embedded)):  # the function, the module
            (grad,) = torch.autograd.grad(value, queries)
            assert value.item() == pytest.approx(reference.item(), abs=1e-9), name
            torch.testing.assert_close(grad, expected_grad, atol=1e-9, rtol=0, msg=name)
    # Every row full: the mask is all True and changes nothing (the parity tests above run without one).
    full = torch.ones_like(mask)
    scores = scores.nan_to_num(0.0)
    for function in (margin_mse, kl_at(temperature)):
        assert function(queries, candidates, scores, full).item() == pytest.approx(
            function(queries, candidates, scores).item(), abs=1e-12
        )


@pytest.mark.parametrize("loss", [OurMarginMSE(), KLDistillLoss(0.5)], ids=["margin_mse", "kl_distill"])
def test_a_batch_without_negatives_gives_a_zero_loss_with_a_gradient(loss) -> None:
    """Rows whose mining kept no negative: the step trains nothing but runs, and backward reaches the encoder."""
    weight = torch.nn.Parameter(torch.randn(4, 4))
    inputs = torch.randn(4, 4)  # 2 queries, 2 documents
    encoder = lambda packed: inputs[packed.input_ids[0]] @ weight  # noqa: E731
    positives_only = PairBatch(*table_sides(2, 2), scores=torch.randn(2, 1), candidates=torch.arange(2)[:, None])
    value = plain_step(encoder, positives_only, loss)
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert weight.grad is not None and torch.equal(weight.grad, torch.zeros_like(weight))
    # Padded to a negative no row has: still zero, not NaN.
    _, candidates, scores, mask = padded_batch([0, 0], dim=4)
    queries = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    value = loss(padded_embedded(queries, candidates, scores, mask))
    assert value.item() == 0.0
    (grad,) = torch.autograd.grad(value, queries)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_margin_mse_inside_matryoshka_is_the_weighted_sum_over_the_renormalized_prefixes() -> None:
    """Distillation wraps like any loss now: MarginMSE on each prefix, renormalized as Matryoshka renormalizes."""
    embeddings, scores = columns(2, dim=16)
    embeddings = [e.requires_grad_() for e in embeddings]
    sizes = [(16, 1.0), (8, 0.5), (4, 0.25)]
    expected = 0.0
    for d, w in sizes:
        queries, *candidates = [torch.nn.functional.normalize(e[:, :d], dim=-1) for e in embeddings]
        expected = expected + w * margin_mse(queries, torch.stack(candidates, dim=1), scores)  # [B, 1 + k, d]
    expected_grads = torch.autograd.grad(expected, embeddings)
    value = ours(MatryoshkaLoss(OurMarginMSE(), dims=[16, 8, 4], weights=[1.0, 0.5, 0.25]), embeddings, scores)
    grads = torch.autograd.grad(value, embeddings)
    assert value.item() == pytest.approx(expected.item(), abs=1e-12)
    torch.testing.assert_close(grads, expected_grads, atol=1e-12, rtol=0)
    check_distillation_data(MatryoshkaLoss(OurMarginMSE(), dims=[16]), has_teacher_scores=True)  # no refusal
    with pytest.raises(LitEmbedError, match="MarginMSELoss: the training data has no teacher scores"):
        check_distillation_data(MatryoshkaLoss(OurMarginMSE(), dims=[16]), has_teacher_scores=False)


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
    data = QAPairDataModule(
        train_path=str(write_jsonl(tmp_path / "s.jsonl", rows)), batch_size=3, max_negatives=2, max_skipped=1
    )
    data.prepare_data()
    assert data.has_teacher_scores
    assert data.rows.examples()[0].scores == (5.0, 0.0, 2.0)  # negatives 0 and 2 of row 0, trimmed to 2
    data.tokenize(tiny_encoder)
    batch = data.collator([3, 1, 4])
    assert batch.scores.tolist() == [[8.0, -3.0, -2.0], [6.0, -1.0, 0.0], [9.0, -4.0, -3.0]]
    assert [[batch.documents.texts[c] for c in row] for row in batch.candidates.tolist()][1] == [
        "answer 1",
        "wrong answer 1.0",
        "wrong answer 1.1",
    ]


def uneven_rows(n: int) -> list[dict]:
    """Scored rows with 0, 1 and 2 hard negatives in turn, as lit-embed-mine's margins leave them."""
    rows = scored_rows(n, k=2)
    for i, row in enumerate(rows):
        k = i % 3
        row["negatives"], row["scores"] = row["negatives"][:k], row["scores"][: 1 + k]
    return rows


def test_rows_with_different_numbers_of_negatives_are_padded_in_the_batch(tmp_path, tiny_encoder, caplog) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", uneven_rows(6))
    data = QAPairDataModule(train_path=str(path), batch_size=3)
    with caplog.at_level("INFO", logger="lit_embed.data.datamodule"):
        data.prepare_data()
    assert f"{path}: 2 of 6 training rows have no hard negatives" in caplog.text
    assert data.has_teacher_scores
    data.tokenize(tiny_encoder)
    batch = data.collator([2, 0, 4])  # 2, 0 and 1 negatives
    assert batch.candidates.tolist() == [[0, 3, 4], [1, -1, -1], [2, 5, -1]]
    assert batch.scores[~(batch.candidates >= 0)].isnan().all()
    assert batch.scores[batch.candidates >= 0].tolist() == [7.0, -2.0, -1.0, 5.0, 9.0, -4.0]
    texts = batch.documents.texts  # positives, then each row's negatives
    assert [[texts[c] for c in row if c >= 0] for row in batch.candidates.tolist()] == [
        ["answer 2", "wrong answer 2.0", "wrong answer 2.1"],
        ["answer 0"],
        ["answer 4", "wrong answer 4.0"],
    ]
    no_negatives = data.collator([0, 3])
    assert no_negatives.candidates.tolist() == [[0], [1]] and no_negatives.scores.tolist() == [[5.0], [8.0]]
    trimmed = QAPairDataModule(train_path=str(path), batch_size=2, max_negatives=1)
    trimmed.prepare_data()
    assert [len(e.scores) for e in trimmed.rows.examples()] == [1, 2, 2, 1, 2, 2]


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


@pytest.mark.parametrize("loss", ["margin_mse", "kl_distill"])
def test_rows_with_zero_one_and_two_negatives_train_to_completion(tmp_path, loss: str) -> None:
    from helpers import compose_train, tiny_run_overrides

    from lit_embed.train import run

    path = write_jsonl(tmp_path / "mined.jsonl", uneven_rows(24))
    overrides = {"data.batch_size": 4, "trainer.max_steps": 4}
    metrics = run(compose_train(tiny_run_overrides(path, None, tmp_path / "run", loss=loss, **overrides)))
    assert metrics is not None and (tmp_path / "run" / "model" / "modules.json").exists()


def test_margin_mse_inside_matryoshka_trains(tmp_path) -> None:
    """``loss=matryoshka`` around MarginMSE: the distillation loss on every prefix, a run that changes the weights."""
    from helpers import compose_train, tiny_run_overrides
    from safetensors.torch import load_file

    from lit_embed.config import build
    from lit_embed.train import run
    from lit_embed.training.checkpoint_io import load_checkpoint

    path = write_jsonl(tmp_path / "mined.jsonl", uneven_rows(24))
    settings = {
        "loss.dims": "[64,32,16]",
        "loss.loss._target_": "lit_embed.losses.distill.MarginMSELoss",
        "data.batch_size": 4,
        "trainer.max_steps": 4,
    }
    overrides = tiny_run_overrides(path, None, tmp_path / "run", loss="matryoshka", **settings)
    cfg = compose_train([*overrides, "~loss.loss.scale"])
    loss = build(cfg.loss, "loss")
    assert isinstance(loss, MatryoshkaLoss) and isinstance(loss.loss, OurMarginMSE)
    assert run(cfg) is not None
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 4
    base = load_file(tmp_path / "run" / "base_model" / "model.safetensors")
    trained = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert any(not torch.equal(trained[k], base[k]) for k in base)


def test_scores_without_a_single_negative_are_refused_before_training(tmp_path, capsys, caplog) -> None:
    from helpers import compose_train, tiny_run_overrides

    from lit_embed.errors import reported
    from lit_embed.train import run

    path = write_jsonl(tmp_path / "unmined.jsonl", scored_rows(8, k=0))
    cfg = compose_train(tiny_run_overrides(path, None, tmp_path / "run", loss="margin_mse"))
    caplog.set_level("INFO", logger="lit_embed.data.datamodule")
    with pytest.raises(SystemExit) as exit_info, reported("lit-embed-train"):
        run(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "MarginMSELoss: the training data has no teacher scores of hard negatives: mine negatives with" in err
    assert "lit-embed-mine" in err and "lit-embed-score" in err and "Traceback" not in err
    assert f"{path}: none of the 8 training rows has a hard negative" in caplog.text
    assert not (tmp_path / "run" / "checkpoints").exists()
    # The same data is fine for a loss that reads no scores: it is the distillation loss that refuses it.
    data = QAPairDataModule(train_path=str(path), batch_size=4)
    data.prepare_data()
    assert not data.has_teacher_scores
