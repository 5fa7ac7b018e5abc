"""loss=matryoshka and evaluation at a truncated dimension: parity with sentence-transformers, config, errors."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from helpers import compose_train, tiny_run_overrides, toy_split, write_toy_data
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss as STMatryoshkaLoss
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as STMNRL
from torch import Tensor

from lit_embed.batch import Embedded
from lit_embed.errors import LitEmbedError
from lit_embed.evaluate import main as eval_main
from lit_embed.evaluation.retrieval import evaluate_encoder
from lit_embed.losses.matryoshka import MatryoshkaLoss
from lit_embed.losses.mnrl import MultipleNegativesRankingLoss, mnrl
from lit_embed.models.encoder import Encoder
from lit_embed.train import run
from lit_embed.training.callbacks.ir_eval import IREvaluationCallback


@pytest.fixture(scope="module")
def st_model(tiny_model_path: str) -> SentenceTransformer:
    # Eval mode (no dropout) and float64: both losses get the same embeddings and rounding stays far below 1e-6.
    return SentenceTransformer(tiny_model_path, device="cpu").double().eval()


def text_columns(num_negative_columns: int) -> list[list[str]]:
    """Anchors, positives and ``num_negative_columns`` columns of hard negatives, 8 rows each."""
    data = toy_split(8)
    negatives = [list(toy_split(8, offset=100 * (c + 1)).corpus.values()) for c in range(num_negative_columns)]
    return [list(data.queries.values()), list(data.corpus.values()), *negatives]


def loss_and_gradients(model: SentenceTransformer, compute: Callable[[], Tensor]) -> tuple[float, list[Tensor]]:
    model.zero_grad()
    loss = compute()
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def st_matryoshka(
    model: SentenceTransformer, columns: list[list[str]], dims: list[int], weights: list[float] | None
) -> tuple[float, list[Tensor]]:
    loss = STMatryoshkaLoss(model, STMNRL(model, scale=20.0), dims, weights)
    features = [model.preprocess(texts) for texts in columns]
    return loss_and_gradients(model, lambda: loss(features, labels=None))


def our_matryoshka(
    model: SentenceTransformer, columns: list[list[str]], dims: list[int], weights: list[float] | None
) -> tuple[float, list[Tensor]]:
    loss = MatryoshkaLoss(MultipleNegativesRankingLoss(scale=20.0), dims, weights)

    def compute() -> Tensor:
        queries, positives, *negatives = [model(model.preprocess(texts))["sentence_embedding"] for texts in columns]
        # Ours takes the documents as one list: positives first, then every query's hard negatives.
        per_query_negatives = torch.stack(negatives, dim=1).flatten(0, 1) if negatives else positives[:0]
        return loss(Embedded(queries, torch.cat([positives, per_query_negatives])))  # documents [8 + 8 * columns, 64]

    return loss_and_gradients(model, compute)


CASES = {
    "in-batch negatives": (0, [64, 32, 16], None),
    "hard negatives": (2, [64, 32, 16], None),
    "custom weights, unsorted dims": (1, [16, 64, 32], [0.25, 1.0, 0.5]),
}


@pytest.mark.parametrize("case", CASES)
def test_equals_sentence_transformers(st_model: SentenceTransformer, case: str) -> None:
    num_negative_columns, dims, weights = CASES[case]
    columns = text_columns(num_negative_columns)
    expected, _ = st_matryoshka(st_model, columns, dims, weights)
    ours, _ = our_matryoshka(st_model, columns, dims, weights)
    assert ours == pytest.approx(expected, abs=1e-6)


def test_gradients_equal_sentence_transformers(st_model: SentenceTransformer) -> None:
    columns = text_columns(2)
    _, expected = st_matryoshka(st_model, columns, [16, 64, 32], [0.25, 1.0, 0.5])
    _, ours = our_matryoshka(st_model, columns, [16, 64, 32], [0.25, 1.0, 0.5])
    assert len(ours) == len(expected) > 0
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


def test_is_the_weighted_sum_of_the_inner_loss_per_size() -> None:
    torch.manual_seed(0)
    queries, documents = torch.randn(6, 16, dtype=torch.float64), torch.randn(9, 16, dtype=torch.float64)
    sizes = [(16, 1.0), (8, 2.0), (4, 0.5)]
    expected = sum(w * mnrl(Embedded(queries[:, :d], documents[:, :d])) for d, w in sizes)
    loss = MatryoshkaLoss(MultipleNegativesRankingLoss(), dims=[16, 8, 4], weights=[1.0, 2.0, 0.5])
    embedded = Embedded(queries, documents)
    assert loss(embedded).item() == pytest.approx(expected.item(), abs=1e-12)
    assert MatryoshkaLoss(MultipleNegativesRankingLoss(), dims=[16])(embedded) == pytest.approx(
        mnrl(embedded).item(), abs=1e-12
    )


def test_truncated_evaluation_equals_sentence_transformers(tiny_model_path: str, tmp_path: Path) -> None:
    encoder = Encoder(tiny_model_path, query_prompt="query: ", document_prompt="passage: ")
    data = toy_split(20, offset=1000)
    ours = evaluate_encoder(encoder, data, batch_size=7, corpus_chunk_size=5, truncate_dim=16)

    encoder.save(tmp_path / "model")
    model = SentenceTransformer(str(tmp_path / "model"), device="cpu")  # prompts come from the saved model
    evaluator = InformationRetrievalEvaluator(
        data.queries, data.corpus, data.relevant_docs, corpus_chunk_size=5, truncate_dim=16
    )
    reference = evaluator(model)
    assert len(ours) == 15
    for key, value in ours.items():
        assert value == pytest.approx(reference[f"cosine_{key}"], abs=1e-4), key
    assert ours != evaluate_encoder(encoder, data, batch_size=7, corpus_chunk_size=5)


def test_matryoshka_run_trains_and_the_eval_command_reproduces_its_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "run"
    overrides = {"loss.dims": "[64,32,16]", "eval.truncate_dim": 32, "load_best_model_at_end": "false"}
    metrics = run(compose_train(["loss=matryoshka", *tiny_run_overrides(train, val, out, **overrides)]))

    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["final"]["step"] == 4
    capsys.readouterr()
    eval_main([str(out), str(val), "--json", "--truncate-dim", "32"])
    measured = json.loads(capsys.readouterr().out)
    final = {key: value for key, value in metrics["final"].items() if key != "step"}
    assert measured == pytest.approx(final, abs=1e-6)  # the logged numbers are those of the 32-dim prefix


@pytest.mark.parametrize(
    ("dims", "weights", "message"),
    [
        ([], None, r"loss.dims needs one or more positive embedding sizes, got \[\]"),
        ([64, 0], None, r"loss.dims needs one or more positive embedding sizes, got \[64, 0\]"),
        ([64, 32], [1.0], r"loss.weights needs one weight per entry of loss.dims: 2 dims \[64, 32\], 1 weights"),
    ],
)
def test_bad_dims_or_weights_are_rejected(dims: Sequence[int], weights: list[float] | None, message: str) -> None:
    with pytest.raises(LitEmbedError, match=message):
        MatryoshkaLoss(MultipleNegativesRankingLoss(), dims, weights)


def test_dims_larger_than_the_embeddings_stop_the_run(tmp_path: Path) -> None:
    loss = MatryoshkaLoss(MultipleNegativesRankingLoss(), dims=[128, 64])
    with pytest.raises(LitEmbedError, match=r"loss.dims \[128, 64\] has sizes larger than the embedding size 32"):
        loss(Embedded(torch.randn(4, 32), torch.randn(4, 32)))

    train, val = write_toy_data(tmp_path, num_train=16, num_val=4)
    overrides = tiny_run_overrides(train, val, tmp_path / "run", **{"loss.dims": "[128]"})
    cfg = compose_train(["loss=matryoshka", *overrides])
    with pytest.raises(LitEmbedError, match="larger than the embedding size 64 of the model"):
        run(cfg)


def test_bad_truncate_dim_is_rejected(
    tiny_encoder: Encoder, tiny_model_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(LitEmbedError, match="eval.truncate_dim must be a positive embedding size or null, got 0"):
        IREvaluationCallback(truncate_dim=0)
    data = toy_split(4)
    with pytest.raises(LitEmbedError, match="truncate_dim=65 is not a size of this model's 64-dimensional embeddings"):
        evaluate_encoder(tiny_encoder, data, truncate_dim=65)

    _, val = write_toy_data(tmp_path, num_train=4, num_val=4)
    for size, message in [("0", "--truncate-dim must be at least 1, got 0"), ("65", "between 1 and 64")]:
        with pytest.raises(SystemExit) as exit_info:
            eval_main([tiny_model_path, str(val), "--truncate-dim", size])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
