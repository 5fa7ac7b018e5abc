"""Small shared builders for the tests."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import numpy as np

from lit_embed.config import compose_config
from lit_embed.data.datamodule import PairCollator
from lit_embed.data.formats import save_llamaindex_json
from lit_embed.data.ragged import Ragged
from lit_embed.data.rows import TrainingRows
from lit_embed.data.schema import QADataset
from lit_embed.data.store import content_key
from lit_embed.data.tokens import TokenizedTexts, tokenize_texts

REPO = Path(__file__).resolve().parents[1]


class SignalAt(L.Callback):
    """Sends this process ``signum`` once training step ``step`` is done, as a cluster that preempts the job does
    (``+callbacks.preempt._target_=helpers.SignalAt +callbacks.preempt.step=3``); in one rank only with ``rank``."""

    def __init__(self, step: int, signum: int = signal.SIGTERM, rank: int | None = None) -> None:
        self.step, self.signum, self.rank = step, signum, rank

    def on_train_batch_end(self, trainer: L.Trainer, *_: object) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), self.signum)


TOPICS = ["sort a list", "open a file", "parse json", "join paths", "read csv", "format dates", "hash bytes"]


def toy_split(n: int, offset: int = 0) -> QADataset:
    """``n`` queries, each with its own short code document (ids q<i> / d<i>)."""
    queries, corpus, relevant = {}, {}, {}
    for i in range(offset, offset + n):
        topic = TOPICS[i % len(TOPICS)]
        queries[f"q{i}"] = f"how do I {topic} number {i}?"
        corpus[f"d{i}"] = f"def helper_{i}():\n    # {topic} variant {i}\n    return {i}"
        relevant[f"q{i}"] = [f"d{i}"]
    return QADataset(queries, corpus, relevant)


def write_toy_data(directory: Path, num_train: int = 48, num_val: int = 20) -> tuple[Path, Path]:
    train, val = directory / "train.json", directory / "val.json"
    save_llamaindex_json(toy_split(num_train), train)
    save_llamaindex_json(toy_split(num_val, offset=1000), val)
    return train, val


def compose_train(overrides: list[str]):
    return compose_config(overrides)


def tiny_run_overrides(train: Path, val: Path | None, output_dir: Path, **extra: object) -> list[str]:
    """A few-step tiny-model CPU run on the toy data; ``extra`` adds or replaces key=value overrides."""
    values: dict[str, object] = {
        "data.train_path": train,
        "data.val_path": val if val is not None else "null",
        "data.batch_size": 8,
        "trainer.max_steps": 4,
        "trainer.log_every_n_steps": 1,
        "optimizer.lr": 1e-3,
        "merge.alphas": "[1.0]",  # the model trained is the model exported (tests/test_recipe.py merges)
        "output_dir": output_dir,
    }
    values.update(extra)
    return ["model=tiny", "data=qa_json", "trainer=cpu"] + [f"{k}={v}" for k, v in values.items()]


def trained_encoders(monkeypatch) -> list:
    """Catches each run's trained encoder as the run hands it to ``finish`` (which exports it)."""
    import lit_embed.train

    trained = []
    finish = lit_embed.train.finish

    def spy(trainer, module, *args, **kwargs):
        trained.append(module.encoder)
        return finish(trainer, module, *args, **kwargs)

    monkeypatch.setattr(lit_embed.train, "finish", spy)
    return trained


def token_store(texts: list[str], kind: str, encoder) -> TokenizedTexts:
    """``texts`` tokenized by ``encoder`` as training tokenizes them (into a temporary store)."""
    return tokenize_texts(Ragged.from_texts(texts), kind, encoder, content_key(texts))


def pair_collator(
    queries: list[str],
    documents: list[str],
    rows: list[tuple[int, int, tuple[int, ...]]],
    encoder,
    length_groups: int = 0,
) -> PairCollator:
    """A collator over ``(query, positive, negatives)`` rows of text indices, as the data module builds one
    (``length_groups``: 0 packs the sides, ``g`` pads them in up to ``g`` length groups)."""
    training = TrainingRows(
        queries=Ragged.from_texts(queries),
        documents=Ragged.from_texts(documents),
        query=np.array([q for q, _, _ in rows], dtype=np.int64),
        positive=np.array([p for _, p, _ in rows], dtype=np.int64),
        negatives=Ragged.from_rows(n for _, _, n in rows),
        other_positives=Ragged.from_rows(() for _ in rows),
        scores=None,
        query_ids=Ragged.from_texts(f"q{i}" for i in range(len(rows))),
        relevant=Ragged.from_rows([p for q2, p, _ in rows if q2 == q] for q in range(len(queries))),
        key="test",
    )
    stores = token_store(queries, "query", encoder), token_store(documents, "document", encoder)
    return PairCollator(training, *stores, length_groups=length_groups)
