"""Rows with several positives (data.multi_positive): each relevant document counts as correct, none as negative."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import compose_train, tiny_run_overrides

from lit_embed.batch import Embedded
from lit_embed.data.datamodule import QAPairDataModule
from lit_embed.data.json_files import save_llamaindex_json
from lit_embed.data.schema import QADataset
from lit_embed.errors import LitEmbedError
from lit_embed.losses.base import EmbeddingLoss
from lit_embed.losses.matryoshka import MatryoshkaLoss
from lit_embed.losses.mnrl import MultipleNegativesRankingLoss, mnrl
from lit_embed.train import run
from lit_embed.training.module import EmbeddingFinetuneModule
from lit_embed.training.steps import GradCache, plain_step


def several_relevant(n: int, offset: int = 0) -> QADataset:
    """``n`` queries with 1 to 3 relevant documents each (and a hard negative for every other query)."""
    queries, corpus, relevant, negatives = {}, {}, {}, {}
    for i in range(offset, offset + n):
        queries[f"q{i}"] = f"how do I handle case {i}?"
        relevant[f"q{i}"] = [f"d{i}_{k}" for k in range(1 + i % 3)]
        for doc in relevant[f"q{i}"]:
            corpus[doc] = f"def case_{i}():  # answer {doc}\n    return {i}"
        if i % 2:
            corpus[f"n{i}"] = f"def unrelated_{i}():\n    pass"
            negatives[f"q{i}"] = [f"n{i}"]
    return QADataset(queries, corpus, relevant, negatives)


def direct_loss(
    q: torch.Tensor, d: torch.Tensor, rows: torch.Tensor, positives: torch.Tensor, scale: float
) -> torch.Tensor:
    """Mean over queries of the mean over its positives of -log softmax, its other positives left out, by loops."""
    scores = F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T * scale
    total = 0.0
    for i in range(q.size(0)):
        own = [j for j in range(d.size(0)) if positives[j] and rows[j] == i]
        terms = []
        for p in own:
            keep = [j for j in range(d.size(0)) if j == p or j not in own]
            terms.append(torch.logsumexp(scores[i, keep], dim=0) - scores[i, p])
        total = total + torch.stack(terms).mean()
    return total / q.size(0)


def test_equals_the_direct_computation_and_chunks_do_not_change_it() -> None:
    torch.manual_seed(0)
    q, d = torch.randn(5, 8, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64)
    # 5 positives, 3 hard negatives (of queries 0, 1, 1), then 4 further positives (of queries 0, 0, 2, 4).
    rows = torch.tensor([0, 1, 2, 3, 4, 0, 1, 1, 0, 0, 2, 4])
    positives = torch.tensor([True] * 5 + [False] * 3 + [True] * 4)
    expected = direct_loss(q, d, rows, positives, 20.0)
    for chunk in (None, 2):
        loss = mnrl(Embedded(q, d, document_rows=rows, positives=positives), query_chunk_size=chunk)
        assert loss.item() == pytest.approx(expected.item(), abs=1e-9)


def test_one_positive_per_query_is_the_classic_loss() -> None:
    torch.manual_seed(1)
    q, d = torch.randn(6, 8, dtype=torch.float64), torch.randn(9, 8, dtype=torch.float64)
    rows = torch.cat([torch.arange(6), torch.tensor([0, 3, 5])])
    positives = torch.arange(9) < 6
    several = Embedded(q, d, document_rows=rows, positives=positives)
    assert mnrl(several).item() == pytest.approx(mnrl(Embedded(q, d)).item(), abs=1e-9)


def test_other_directions_are_refused_with_several_positives() -> None:
    q, d = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(LitEmbedError, match="loss.directions=.* cannot score rows with several positives"):
        mnrl(Embedded(q, d, positives=torch.ones(3, dtype=torch.bool)), directions=["query_to_doc", "doc_to_query"])


def test_no_positive_of_a_query_is_in_its_batch_as_a_negative(tmp_path: Path, tiny_encoder) -> None:
    data = several_relevant(30)
    save_llamaindex_json(data, tmp_path / "train.json")
    dm = QAPairDataModule(train_path=str(tmp_path / "train.json"), batch_size=6, multi_positive=True)
    dm.tokenize(tiny_encoder)
    collator = dm.collator
    doc_ids = {text: doc for doc, text in data.corpus.items()}
    relevant_batches = 0
    for world, rank in ((1, 0), (2, 0), (2, 1)):
        for indices in dm.batch_sampler(rank, world):
            batch = collator(indices)
            texts = batch.documents.texts
            assert len(batch.documents) == len(texts) == len(batch.positives) == len(batch.document_rows)
            for i, query_id in enumerate(batch.query_ids):
                owned = zip(texts, batch.document_rows, batch.positives, strict=True)
                mine = {doc_ids[t] for t, r, p in owned if r == i and p}
                assert mine == set(data.relevant_docs[query_id])  # all its relevant documents count as positives
                others = {doc_ids[t] for t, r in zip(texts, batch.document_rows, strict=True) if r != i}
                assert not mine & others  # and none of them is another row's document, a negative for it
                relevant_batches += len(mine) > 1
    assert relevant_batches > 0
    # Each global batch (the two ranks' halves together) repeats no text either: gathered negatives are clean too.
    halves = [list(dm.batch_sampler(rank, 2)) for rank in (0, 1)]
    for first, second in zip(*halves, strict=True):
        texts_in = [t for i in first + second for t in dm.rows.row_texts().row(i).tolist()]
        assert len(texts_in) == len(set(texts_in))


def test_composes_with_cached_and_matryoshka(tmp_path: Path, tiny_encoder) -> None:
    save_llamaindex_json(several_relevant(12), tmp_path / "train.json")
    dm = QAPairDataModule(train_path=str(tmp_path / "train.json"), batch_size=6, multi_positive=True)
    dm.tokenize(tiny_encoder)
    batch = dm.collator(next(iter(dm.batch_sampler())))
    tiny_encoder.eval()  # no dropout: the three losses embed the same texts to the same vectors
    loss = MultipleNegativesRankingLoss()
    plain = plain_step(tiny_encoder, batch, loss)
    expected = mnrl(
        Embedded(
            tiny_encoder(batch.queries),
            tiny_encoder(batch.documents),
            document_rows=batch.document_rows,
            positives=batch.positives,
        )
    )
    assert plain.item() == pytest.approx(expected.item(), abs=1e-5)
    cached = GradCache(loss, mini_batch_size=4)(tiny_encoder, batch, loss)
    assert cached.item() == pytest.approx(plain.item(), abs=1e-5)
    full = plain_step(tiny_encoder, batch, MatryoshkaLoss(loss, dims=[64]))
    assert full.item() == pytest.approx(plain.item(), abs=1e-5)
    nested = MatryoshkaLoss(loss, dims=[64])
    cached_nested = GradCache(nested, mini_batch_size=4)(tiny_encoder, batch, nested)
    assert cached_nested.item() == pytest.approx(plain.item(), abs=1e-5)


def test_tiny_run_trains_and_exports(tmp_path: Path) -> None:
    save_llamaindex_json(several_relevant(24), tmp_path / "train.json")
    save_llamaindex_json(several_relevant(8, offset=1000), tmp_path / "val.json")
    out = tmp_path / "run"
    overrides = tiny_run_overrides(
        tmp_path / "train.json", tmp_path / "val.json", out, **{"data.multi_positive": "true", "trainer.max_steps": 2}
    )
    metrics = run(compose_train(overrides))
    assert metrics["final"]["step"] == 2
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert (out / "model" / "config_sentence_transformers.json").exists()


def test_a_loss_of_one_positive_refuses_multi_positive_rows(tmp_path: Path, tiny_encoder) -> None:
    class OnePositive(EmbeddingLoss):
        def forward(self, embedded: Embedded) -> torch.Tensor:
            return mnrl(Embedded(embedded.queries, embedded.documents))

    save_llamaindex_json(several_relevant(12), tmp_path / "train.json")
    dm = QAPairDataModule(train_path=str(tmp_path / "train.json"), batch_size=6, multi_positive=True)
    dm.tokenize(tiny_encoder)
    batch = dm.collator(next(iter(dm.batch_sampler())))
    with pytest.raises(LitEmbedError, match="OnePositive scores one positive per query.*data.multi_positive=false"):
        EmbeddingFinetuneModule(tiny_encoder, OnePositive()).task_loss(batch)


@pytest.mark.parametrize("loss", ["loss=gist", "loss.directions=[query_to_doc,doc_to_query]"])
def test_a_run_whose_loss_scores_one_positive_is_refused_before_training(tmp_path: Path, loss: str) -> None:
    save_llamaindex_json(several_relevant(24), tmp_path / "train.json")
    out = tmp_path / "run"
    overrides = tiny_run_overrides(tmp_path / "train.json", None, out, **{"data.multi_positive": "true"})
    with pytest.raises(LitEmbedError, match="data.multi_positive=true gives each row several positives"):
        run(compose_train([*overrides, loss]))
    assert not (out / "checkpoints").exists() and not (out / "model").exists()
