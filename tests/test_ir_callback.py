"""The IR evaluation callback: parity with sentence-transformers, schedule, logging, sharding under DDP."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import compose_train, tiny_run_overrides, write_toy_data
from sentence_transformers import SentenceTransformer
from sentence_transformers.evaluation import InformationRetrievalEvaluator

from lit_embed.data.schema import QADataset
from lit_embed.evaluation.retrieval import evaluate_encoder, evaluate_encoder_and_rank
from lit_embed.models.encoder import Encoder
from lit_embed.train import run


def dataset_with_several_relevant_docs() -> QADataset:
    # Exact score ties are covered at the embedding level in test_ir_metrics.py: through a real encoder two
    # copies of a text embedded in differently shaped batches differ in the last float32 bit, in
    # sentence-transformers as in lit_embed, so a tie here would test rounding noise, not tie-breaking.
    corpus = {f"doc{i:02d}": f"passage {i} about {['files', 'json', 'paths', 'dates'][i % 4]}" for i in range(30)}
    corpus["doc99"] = "an extra passage about json and files"
    queries = {f"q{i}": f"question {i} on {['files', 'json', 'paths', 'dates'][i % 4]}" for i in range(12)}
    relevant = {
        f"q{i}": [f"doc{i:02d}", f"doc{(i + 4) % 30:02d}"] + (["doc99"] if i % 3 == 0 else []) for i in range(12)
    }
    return QADataset(queries, corpus, relevant)


def test_equals_sentence_transformers_evaluator_with_prompts(tiny_model_path: str, tmp_path: Path) -> None:
    encoder = Encoder(tiny_model_path, query_prompt="query: ", document_prompt="passage: ")
    data = dataset_with_several_relevant_docs()
    ours = evaluate_encoder(encoder, data, batch_size=7, corpus_chunk_size=5)

    encoder.save(tmp_path / "model")
    model = SentenceTransformer(str(tmp_path / "model"), device="cpu")  # prompts come from the saved model
    evaluator = InformationRetrievalEvaluator(data.queries, data.corpus, data.relevant_docs, corpus_chunk_size=5)
    reference = evaluator(model)
    assert len(ours) == 15
    for key, value in ours.items():
        assert value == pytest.approx(reference[f"cosine_{key}"], abs=1e-4), key


def test_schedule_logging_and_history(tmp_path: Path) -> None:
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "run"
    run(compose_train(tiny_run_overrides(train, val, out, **{"eval.evaluation_steps": 2, "trainer.max_steps": 5})))
    with open(out / "logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/mrr@10")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 5]  # before training, every 2 steps, at the end
    assert {"val/ndcg@10", "val/map@100", "val/accuracy@1", "val/precision@3", "val/recall@10"} <= rows[0].keys()


def _sharded_worker(rank: int, world: int, model_path: str, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        encoder = Encoder(model_path)
        texts_seen = []
        original = encoder.encode

        def counting_encode(texts, kind, batch_size=64):
            texts_seen.extend(texts)
            return original(texts, kind, batch_size)

        encoder.encode = counting_encode
        data = dataset_with_several_relevant_docs()
        metrics, rankings = evaluate_encoder_and_rank(encoder, data, batch_size=4)
        results[rank] = (metrics, rankings.tolist(), len(texts_seen))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_evaluate_their_shard_and_agree(tiny_model_path: str, tmp_path: Path) -> None:
    data = dataset_with_several_relevant_docs()
    single, single_rankings = evaluate_encoder_and_rank(Encoder(tiny_model_path), data, batch_size=4)
    with mp.Manager() as manager:
        results = manager.dict()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        mp.spawn(_sharded_worker, args=(2, tiny_model_path, str(tmp_path / "init"), results), nprocs=2)
        results = dict(results)
    total_texts = len(data.queries) + len(data.corpus)
    for rank in (0, 1):
        metrics, rankings, encoded = results[rank]
        assert encoded <= total_texts // 2 + 1  # each rank embeds about half, nobody the whole set
        for key, value in single.items():
            assert metrics[key] == pytest.approx(value, abs=1e-6), key
        # Each rank ranked half the queries; every rank ends with all of them, in the dataset's order.
        assert rankings == single_rankings.tolist()
