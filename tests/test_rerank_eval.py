"""The two-stage pipeline's metrics: the first stage's top-K reordered by a reranker, as sentence-transformers'
CrossEncoderRerankingEvaluator scores it (always_rerank_positives=False), and ``lit-embed-eval --rerank``."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import TOPICS, write_toy_data
from sentence_transformers import CrossEncoder
from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator

from lit_embed import evaluate
from lit_embed.data.formats import load_dataset
from lit_embed.data.schema import QADataset
from lit_embed.evaluation.rerank import Candidates, evaluate_pipeline, first_stage
from lit_embed.models.encoder import Encoder
from lit_embed.models.tiny import build_tiny_cross_encoder


@pytest.fixture(scope="module")
def reranker_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("reranker") / "model", seed=3)


def several_positives(num_queries: int = 12, seed: int = 0) -> QADataset:
    """Queries with 1 to 4 relevant documents among 60, so some fall outside a small top-K."""
    rng = random.Random(seed)
    corpus = {f"d{i}": f"def f_{i}(x):\n    # {TOPICS[i % len(TOPICS)]} {i}\n    return x + {i}" for i in range(60)}
    queries = {f"q{i}": f"how to {TOPICS[i % len(TOPICS)]} with item {i}" for i in range(num_queries)}
    relevant = {q: rng.sample(sorted(corpus), rng.randint(1, 4)) for q in queries}
    return QADataset(queries, corpus, relevant)


def their_metrics(candidates: Candidates, dataset: QADataset, model) -> dict[str, float]:
    """sentence-transformers' evaluator on the same candidates, each query's top-K as its ranked documents."""
    samples = [
        {
            "query": dataset.queries[query],
            "positive": [dataset.corpus[d] for d in dataset.relevant_docs[query]],
            "documents": [dataset.corpus[candidates.corpus_ids[d]] for d in row],
        }
        for query, row in zip(candidates.query_ids, candidates.documents.tolist(), strict=True)
    ]
    evaluator = CrossEncoderRerankingEvaluator(samples, at_k=10, always_rerank_positives=False, write_csv=False)
    return evaluator(model)


@pytest.mark.parametrize("top_k", [5, 20])
def test_both_stages_equal_sentence_transformers_reranking_evaluator(tiny_model_path: str, top_k: int) -> None:
    """Random scores (so every order is tried), queries with several positives, some not fetched: the first stage's
    and the reranked MAP, MRR@10 and NDCG@10 equal the evaluator's base_* and reranked numbers."""
    dataset = several_positives()
    candidates = first_stage(Encoder(tiny_model_path), dataset, top_k)
    assert candidates.documents.shape == (12, top_k)
    rng = random.Random(1)
    scores = {pair: rng.random() for pair in candidates.pairs(dataset)}

    def predict(pairs, **_):
        import numpy as np

        return np.array([scores[tuple(pair)] for pair in pairs])

    ours = evaluate_pipeline(candidates, dataset, lambda pairs: [scores[p] for p in pairs])
    model = SimpleNamespace(predict=predict, model_card_data=SimpleNamespace(set_evaluation_metrics=lambda *a: None))
    theirs = their_metrics(candidates, dataset, model)
    for stage, prefix in (("retriever", "base_"), ("reranked", "")):
        for name in ("map", "mrr@10", "ndcg@10"):
            assert ours[stage][name] == pytest.approx(theirs[prefix + name], abs=1e-12), (stage, name)
    if top_k == 5:  # some positives were not fetched: no order of the candidates reaches them
        assert ours["reranked"]["recall@10"] == ours["retriever"]["recall@10"] < 1


def test_a_real_cross_encoder_gives_the_evaluators_numbers(tiny_model_path: str, reranker_path: str) -> None:
    dataset = several_positives(seed=2)
    candidates = first_stage(Encoder(tiny_model_path), dataset, 20)
    # Raw logits: a random model's sigmoids near 0.5 tie in float32, and the evaluator breaks ties otherwise.
    model = CrossEncoder(reranker_path, device="cpu", activation_fn=torch.nn.Identity())
    # In the evaluator's batches of 64, so that padding is alike and near-equal scores come out the same.
    ours = evaluate_pipeline(candidates, dataset, lambda pairs: model.predict(pairs, batch_size=64).tolist())
    theirs = their_metrics(candidates, dataset, model)
    for name in ("map", "mrr@10", "ndcg@10"):
        assert ours["reranked"][name] == pytest.approx(theirs[name], abs=1e-6)


def test_lit_embed_eval_rerank_prints_both_stages(
    tmp_path: Path, tiny_model_path: str, reranker_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, val = write_toy_data(tmp_path)
    evaluate.main([tiny_model_path, str(val), "--json", "--device=cpu"])
    alone = json.loads(capsys.readouterr().out)
    run_dir = tmp_path / "run"  # a run's output directory: its model/ reranks
    shutil.copytree(reranker_path, run_dir / "model")
    evaluate.main([tiny_model_path, str(val), "--rerank", str(run_dir), "--top-k=12", "--json", "--device=cpu"])
    stages = json.loads(capsys.readouterr().out)
    assert set(stages) == {"retriever", "reranked", "pipeline"}
    # No fusion.json next to the reranker: the shipped pipeline is the reranker's order.
    assert stages["pipeline"] == {**stages["reranked"], "weight": 1.0}
    # Every relevant document of the whole corpus within the first 10 is in the top 12: the first stage's numbers
    # are the retriever's own.
    for name in ("mrr@10", "ndcg@10", "recall@10"):
        assert stages["retriever"][name] == pytest.approx(alone[name], abs=1e-12)
    expected = evaluate.evaluate_reranking(tiny_model_path, reranker_path, val, top_k=12, device="cpu")
    assert stages == expected

    evaluate.main([tiny_model_path, str(val), "--rerank", reranker_path, "--top-k=12", "--device=cpu"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["metric", "retriever", "reranked", "pipeline", "change"]
    assert [line.split()[0] for line in table[1:5]] == ["mrr@10", "ndcg@10", "map", "recall@10"]
    assert table[5].startswith("pipeline: 1 * z(reranker) + 0 * z(retriever cosine)")
    assert load_dataset(val).queries  # the data file is read, never written


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rerank", "{missing}"], "--rerank {missing} does not exist"),
        (["--rerank", "{retriever}", "--top-k=0"], "--top-k must be at least 1"),
        (["--rerank", "{retriever}", "--index", "{tmp}/index"], "leave out --index and --truncate-dim"),
    ],
)
def test_a_bad_rerank_argument_exits_2_naming_it(
    tmp_path: Path, tiny_model_path: str, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    _, val = write_toy_data(tmp_path)
    values = {"missing": str(tmp_path / "nope"), "retriever": tiny_model_path, "tmp": str(tmp_path)}
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([tiny_model_path, str(val), *[part.format(**values) for part in extra]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message.format(**values) in err and "Traceback" not in err
