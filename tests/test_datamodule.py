"""The DataModule: tokenizes once, pads per batch, never repeats a text in a batch, carries hard negatives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_embed.data.datamodule import QAPairDataModule
from lit_embed.data.formats import DataFormatError


class CountingTokenizer:
    """Wraps the tiny encoder and counts how many texts it is asked to tokenize."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder
        self.pad_token_id = encoder.pad_token_id
        self.texts_seen = 0

    def tokenize(self, texts, kind):
        self.texts_seen += len(texts)
        return self.encoder.tokenize(texts, kind)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def shared_doc_rows(n: int) -> list[dict]:
    # Two questions per document, as LlamaIndex's generate_qa_embedding_pairs writes them.
    return [
        {"query": f"question {i} about topic {i // 2}", "positive": f"passage on topic {i // 2} " * (1 + (i // 2) % 5)}
        for i in range(n)
    ]


def test_tokenizes_each_distinct_text_once_and_pads_per_batch(tmp_path: Path, tiny_encoder) -> None:
    rows = shared_doc_rows(40)
    dm = QAPairDataModule(train_path=str(write_jsonl(tmp_path / "t.jsonl", rows)), batch_size=8, use_all_docs=True)
    tokenizer = CountingTokenizer(tiny_encoder)
    dm.tokenize(tokenizer)
    assert tokenizer.texts_seen == 40 + 20  # 40 distinct queries + 20 distinct passages, once each

    loader = dm.train_dataloader()
    widths = set()
    for epoch in range(2):
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            features = batch["documents"]
            ids, mask = features["input_ids"], features["attention_mask"]
            assert ids.shape == mask.shape and mask.sum(1).max() == ids.shape[1]  # padded to the longest row only
            widths.add(ids.shape[1])
            texts = [tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask, strict=True)]
            assert len(texts) == len(set(texts)), "a passage repeated inside a batch would be a false negative"
            assert batch["queries"]["input_ids"].shape[0] == len(texts)
    assert tokenizer.texts_seen == 60  # iterating epochs does not tokenize again
    assert len(widths) > 1


def test_prompts_are_applied_when_tokenizing(tmp_path: Path, tiny_model_path: str) -> None:
    from lit_embed.models.encoder import Encoder

    encoder = Encoder(tiny_model_path, query_prompt="query: ")
    dm = QAPairDataModule(train_path=str(write_jsonl(tmp_path / "t.jsonl", shared_doc_rows(8))), batch_size=4)
    dm.tokenize(encoder)
    batch = next(iter(dm.train_dataloader()))
    query_prefix = encoder.model.tokenizer("query: ", add_special_tokens=False)["input_ids"]
    first = batch["queries"]["input_ids"][0].tolist()
    assert first[1 : 1 + len(query_prefix)] == query_prefix
    assert batch["queries"]["prompt_length"] == len(query_prefix) + 1  # [CLS] + prompt, for prompt-aware pooling


def test_hard_negatives_follow_the_positives(tmp_path: Path, tiny_encoder) -> None:
    rows = [{"query": f"q{i}", "positive": f"pos {i}", "negatives": [f"neg {i} a", f"neg {i} b"]} for i in range(12)]
    dm = QAPairDataModule(train_path=str(write_jsonl(tmp_path / "t.jsonl", rows)), batch_size=4, max_negatives=1)
    dm.tokenize(tiny_encoder)
    batch = next(iter(dm.train_dataloader()))
    assert batch["documents"]["input_ids"].shape[0] == 4 + 4  # 4 positives, then one negative each
    assert batch["num_negatives"] == 4


def test_too_little_data_for_one_batch(tmp_path: Path, tiny_encoder) -> None:
    dm = QAPairDataModule(train_path=str(write_jsonl(tmp_path / "small.jsonl", shared_doc_rows(3))), batch_size=8)
    with pytest.raises(DataFormatError, match=r"small\.jsonl: only 3 training pairs.*data\.batch_size=8"):
        dm.tokenize(tiny_encoder)


def test_missing_train_path() -> None:
    with pytest.raises(DataFormatError, match="data.train_path is not set"):
        QAPairDataModule().prepare_data()


def test_lightning_reshuffles_every_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import compose_train, tiny_run_overrides, write_toy_data

    from lit_embed.models.module import EmbeddingFinetuneModule
    from lit_embed.train import run

    seen: list[tuple[int, tuple[int, ...]]] = []

    def record(self, batch, batch_idx):
        seen.append((self.current_epoch, tuple(batch["queries"]["input_ids"][:, 7].tolist())))

    monkeypatch.setattr(EmbeddingFinetuneModule, "on_train_batch_start", record, raising=False)
    train, val = write_toy_data(tmp_path)
    overrides = {"trainer.max_epochs": 2, "trainer.max_steps": -1}
    run(compose_train(tiny_run_overrides(train, None, tmp_path / "run", **overrides)))
    epochs = [[rows for epoch, rows in seen if epoch == e] for e in (0, 1)]
    assert len(epochs[0]) == len(epochs[1]) == 6
    assert epochs[0] != epochs[1]
    assert sorted(q for rows in epochs[0] for q in rows) == sorted(q for rows in epochs[1] for q in rows)
