"""The token store: the tokenizer's own ids, kept compact on disk, built once per key, shared by ranks; padded as the
tokenizer pads them where an encoder cannot pack."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, tiny_run_overrides, write_toy_data

from lit_embed.data import store as store_module
from lit_embed.data.datamodule import QAPairDataModule
from lit_embed.data.ragged import Ragged
from lit_embed.data.tokens import FastTokenIds, tokenize_texts
from lit_embed.errors import LitEmbedError
from lit_embed.models.encoder import Encoder


def padded(tokens, indices, side: str = "right", pad_id: int = 0) -> dict:
    """The store's rows ``indices`` as an encoder that cannot pack computes them."""
    return tokens.packed(indices).padded(range(len(indices)), side, pad_id)


def write_jsonl(path: Path, n: int) -> Path:
    rows = [
        {"query": f"question {i}?", "positive": f"passage {i} " + "word " * (i % 17), "negatives": [f"other {i % 5}"]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("model", ["encoder", "decoder"])
def test_batches_are_what_the_tokenizer_gives_the_same_texts(tmp_path: Path, model_paths, model: str) -> None:
    """Each batch side, padded as the encoder pads it, equals the encoder's own tokenize() of its texts: ids, mask,
    per-call values, padding side (type ids that are all 0 are the model's default and not carried)."""
    encoder = Encoder(model_paths[model], query_prompt="query: ", max_seq_length=12)
    data = QAPairDataModule(
        train_path=str(write_jsonl(tmp_path / "t.jsonl", 40)),
        batch_size=8,
        cache_dir=str(tmp_path / "c"),
        packing=False,
    )
    data.tokenize(encoder)
    for indices in data.batch_sampler():
        batch = data.collator(indices)
        for side, kind in ((batch.queries, "query"), (batch.documents, "document")):
            got = side.padded(range(len(side)), encoder.padding_side, encoder.pad_token_id)
            expected = encoder.tokenize(side.texts, kind)
            assert not expected.pop("token_type_ids", torch.zeros(1)).any()
            assert got.keys() == expected.keys()
            for key, value in expected.items():
                assert (got[key] == value).all() if hasattr(value, "shape") else got[key] == value, key


@pytest.mark.parametrize("model", ["encoder", "decoder"])
def test_the_rust_tokenizer_is_used_where_it_gives_the_encoders_ids(model_paths, model: str) -> None:
    encoder = Encoder(model_paths[model], query_prompt="query: ", max_seq_length=12)
    texts = Ragged.from_texts([f"question {i}: " + "many words " * (i % 9) for i in range(300)])
    fast = FastTokenIds.verified(encoder, "query", texts)
    assert fast is not None  # the equality test above then checks its batches against tokenize()
    counts, columns, _ = fast(texts.texts(range(300)))
    expected = encoder.tokenize(texts.texts(range(300)), "query")
    mask = expected["attention_mask"].bool()
    assert counts.tolist() == mask.sum(1).tolist() and max(counts) == 12  # truncated as tokenize truncates
    assert columns["input_ids"].tolist() == expected["input_ids"][mask].tolist()


MULTILINGUAL = [
    "Wie funktioniert die Größenänderung?",
    "如何在 Python 中读取文件？",
    "كيف أقرأ ملفًا في بايثون؟",
    "Как прочитать файл?",
    "ファイルを読むには",
    "e\u0301te\u0301 cafe\u0301 (combining accents)",
    "zero\u200bwidth and\u00a0non-breaking spaces",
    "emoji 🙂👍🏽 and symbols ∑∫≠",
    "\tTabs\nnew lines\r\n  and   runs of spaces  ",
    "x" * 3000,
    "UPPER lower MiXeD 12345 3.14 a_b-c/d",
]


@pytest.mark.parametrize("model", ["encoder", "decoder"])
def test_stored_ids_equal_tokenize_on_every_text_in_many_scripts(tmp_path: Path, model_paths, model: str) -> None:
    encoder = Encoder(model_paths[model], query_prompt="query: ", max_seq_length=32)
    texts = Ragged.from_texts(MULTILINGUAL * 3 + [f"{t} #{i}" for i, t in enumerate(MULTILINGUAL)])
    tokens = tokenize_texts(texts, "query", encoder, "multilingual", tmp_path)
    for i in range(len(texts)):
        expected = encoder.tokenize([texts.text(i)], "query")
        got = padded(tokens, [i], encoder.padding_side, encoder.pad_token_id)
        assert got["input_ids"].tolist() == expected["input_ids"].tolist(), texts.text(i)


class _ReversingEncoder:
    """An encoder whose tokenize does more than its Rust tokenizer (it reverses each text first)."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self.tokenizer, self.prompt, self.vocab_size = encoder.tokenizer, encoder.prompt, encoder.vocab_size
        self.pad_token_id, self.max_seq_length = encoder.pad_token_id, encoder.max_seq_length

    def tokenize(self, texts: list[str], kind: str) -> dict:
        return self.encoder.tokenize([text[::-1] for text in texts], kind)


def test_an_encoder_whose_ids_differ_from_its_rust_tokenizer_is_tokenized_by_itself(tmp_path: Path, tiny_encoder):
    encoder = _ReversingEncoder(tiny_encoder)
    texts = Ragged.from_texts([f"text number {i}" for i in range(40)])
    assert FastTokenIds.verified(encoder, "document", texts) is None
    tokens = tokenize_texts(texts, "document", encoder, "texts-key", tmp_path)
    expected = encoder.tokenize(texts.texts(range(40)), "document")
    assert (padded(tokens, range(40), "right", encoder.pad_token_id)["input_ids"] == expected["input_ids"]).all()


def test_token_ids_are_stored_compactly(tmp_path: Path, tiny_encoder) -> None:
    texts = Ragged.from_texts([f"text number {i}" for i in range(50)])
    tokens = tokenize_texts(texts, "document", tiny_encoder, "texts-key", tmp_path)
    (directory,) = tmp_path.glob("tokens-document-*")
    stored = ["input_ids.offsets.npy", "input_ids.values.npy", "manifest.json", "meta.json"]
    assert sorted(p.name for p in directory.iterdir()) == stored
    assert tokens.features["input_ids"].values.dtype == np.uint16  # BERT's 30,522 ids: 2 bytes a token
    assert isinstance(tokens.features["input_ids"].values, np.memmap)
    assert list(tokens.features) == ["input_ids"]  # one-segment type ids, all 0: not stored


def test_a_second_tokenization_reuses_the_store_and_each_setting_has_its_own(
    tmp_path: Path, model_paths, caplog
) -> None:
    texts = Ragged.from_texts([f"text number {i}" for i in range(30)])
    cache = tmp_path / "cache"

    def store(encoder: Encoder, kind: str = "query", key: str = "texts-a") -> Path:
        tokenize_texts(texts, kind, encoder, key, cache)
        return max(cache.glob("tokens-*"), key=os.path.getmtime)

    bert = model_paths["encoder"]
    with caplog.at_level(logging.INFO, logger=store_module.__name__):
        first = store(Encoder(bert))
        assert store(Encoder(bert)) == first  # a new encoder object, the same tokens
    assert sum(r.getMessage().startswith("Building") for r in caplog.records) == 1
    others = [
        store(Encoder(bert, query_prompt="query: ")),
        store(Encoder(bert, max_seq_length=8)),
        store(Encoder(model_paths["decoder"])),
        store(Encoder(bert), key="texts-b"),
        store(Encoder(bert), kind="document"),
    ]
    cut_left = Encoder(bert, max_seq_length=4)
    cut_left.tokenizer.truncation_side = "left"  # other ids for a long text
    padded_left = Encoder(bert)
    padded_left.tokenizer.padding_side = "left"  # the same ids: padding is the encoder's, per batch
    assert len({first, *others, store(cut_left)}) == 7
    store(padded_left)
    assert len(list(cache.glob("tokens-*"))) == 7  # none built for it


def test_an_adapters_table_rows_are_not_kept_across_runs(tmp_path: Path, tiny_encoder) -> None:
    class TableLookup:
        """As AdaptedEncoder: rows of a table that grows with each text it is asked for."""

        pad_token_id, max_seq_length, tokenizer, packing_unsupported = 0, 8, tiny_encoder.tokenizer, None

        def tokenize(self, texts, kind):
            ids = torch.arange(len(texts))[:, None]
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    tokens = tokenize_texts(Ragged.from_texts(["a", "b"]), "query", TableLookup(), "k", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    assert tokens.packed([1, 0]).input_ids.tolist() == [[1, 0]]


def test_two_ddp_ranks_tokenize_once_between_them(tmp_path: Path) -> None:
    """``trainer=ddp_cpu``: one process converts and tokenizes, the other waits and opens the same stores."""
    train, val = write_toy_data(tmp_path)
    cache = tmp_path / "cache"
    overrides = tiny_run_overrides(train, val, tmp_path / "run", **{"trainer.max_steps": 1, "data.batch_size": 8})
    overrides[overrides.index("trainer=cpu")] = "trainer=ddp_cpu"
    overrides.append(f"data.cache_dir={cache}")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("Building the document token store") == 1, output[-3000:]
    assert output.count("Building the training rows") == 1
    assert output.count("(tokenized once;") == 2  # both ranks log, and both opened the stores
    assert len(list(cache.glob("tokens-document-*"))) == len(list(cache.glob("rows-*"))) == 1


def test_type_ids_that_turn_non_zero_late_are_stored_from_the_start(tmp_path: Path, tiny_encoder) -> None:
    class SecondSegmentLate:
        """The tiny encoder, with type id 1 on every token of texts that say 'late' (only in the last chunk)."""

        pad_token_id, max_seq_length = tiny_encoder.pad_token_id, tiny_encoder.max_seq_length

        def tokenize(self, texts, kind):
            features = tiny_encoder.tokenize(texts, kind)
            late = torch.tensor(["late" in t for t in texts])[:, None]
            features["token_type_ids"] = (late & features["attention_mask"].bool()).long()
            return features

    texts = [f"early text {i}" for i in range(10)] + ["late text"]
    tokens = tokenize_texts(Ragged.from_texts(texts), "query", SecondSegmentLate(), "k", chunk_size=4)
    assert "token_type_ids" in tokens.features
    indices = [10, 0, 9]
    expected = SecondSegmentLate().tokenize([texts[i] for i in indices], "query")
    got = padded(tokens, indices, "right", tiny_encoder.pad_token_id)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert (got[key] == expected[key]).all(), key


def test_a_mapped_store_travels_to_worker_processes_as_file_names(tmp_path: Path, tiny_encoder) -> None:
    import pickle

    texts = Ragged.from_texts([f"text number {i} " * 20 for i in range(200)])
    tokens = tokenize_texts(texts, "document", tiny_encoder, "k", tmp_path)
    ids = tokens.features["input_ids"]
    sent = pickle.dumps(ids)
    assert len(sent) < 1000 < ids.values.nbytes
    again = pickle.loads(sent)
    assert isinstance(again.values, np.memmap) and np.array_equal(again.values, ids.values)


def test_a_cache_dir_that_cannot_hold_the_store_is_one_clear_error(tmp_path: Path, tiny_encoder) -> None:
    texts = Ragged.from_texts(["a text", "another"])
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(LitEmbedError, match=r"data\.cache_dir=.*file: cannot store the document token store"):
        tokenize_texts(texts, "document", tiny_encoder, "key", not_a_folder)

    def disk_full(directory: Path) -> None:
        (directory / "part.npy").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(LitEmbedError, match=r"No space left on device\)\. Set data\.cache_dir"):
        store_module.built_once(tmp_path / "cache", "store", disk_full, "the store")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".store.lock"]  # nothing half-written is left
