"""The DataModule: tokenizes once, pads per batch, never repeats a text in a batch, carries hard negatives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lit_embed.batch import padding_groups
from lit_embed.data.datamodule import QAPairDataModule
from lit_embed.errors import DataFormatError, LitEmbedError


class CountingTokenizer:
    """Wraps the tiny encoder and counts how many texts it is asked to tokenize."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder
        self.pad_token_id = encoder.pad_token_id
        self.max_seq_length = encoder.max_seq_length
        self.packing_unsupported = None
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


def side_texts(side) -> list[tuple[int, ...]]:
    """Each text's token ids in a packed batch side."""
    return [tuple(ids.tolist()) for ids in side.input_ids[0].split(side.lengths)]


def test_tokenizes_each_distinct_text_once_and_packs_per_batch(tmp_path: Path, tiny_encoder) -> None:
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
            side = batch.documents
            assert side.input_ids.size(1) == sum(side.lengths)  # no padding anywhere
            texts = side_texts(side)
            assert len(texts) == len(set(texts)), "a passage repeated inside a batch would be a false negative"
            assert len(batch.queries) == len(texts) and side.texts and len(side.texts) == len(texts)
            rows = sorted(range(len(side)), key=side.lengths.__getitem__)[: len(side) // 2]
            padded = side.padded(rows, "right", tiny_encoder.pad_token_id)  # what an encoder that cannot pack does
            assert padded["attention_mask"].sum(1).max() == padded["input_ids"].shape[1]  # padded to its longest
            pairs = zip(padded["input_ids"], padded["attention_mask"], strict=True)
            assert [tuple(ids[mask.bool()].tolist()) for ids, mask in pairs] == [texts[i] for i in rows]
            widths.add(padded["input_ids"].shape[1])
    assert tokenizer.texts_seen == 60  # iterating epochs does not tokenize again
    assert len(widths) > 1


def test_prompts_are_applied_when_tokenizing(tmp_path: Path, tiny_model_path: str) -> None:
    from lit_embed.models.encoder import Encoder

    encoder = Encoder(tiny_model_path, query_prompt="query: ")
    dm = QAPairDataModule(
        train_path=str(write_jsonl(tmp_path / "t.jsonl", shared_doc_rows(8))), batch_size=4, packing=False
    )
    dm.tokenize(encoder)
    batch = next(iter(dm.train_dataloader()))
    query_prefix = encoder.model.tokenizer("query: ", add_special_tokens=False)["input_ids"]
    features = batch.queries.padded(range(len(batch.queries)), encoder.padding_side, encoder.pad_token_id)
    assert features["input_ids"][0, 1 : 1 + len(query_prefix)].tolist() == query_prefix
    assert features["prompt_length"] == len(query_prefix) + 1  # [CLS] + prompt, for prompt-aware pooling


def test_hard_negatives_follow_the_positives(tmp_path: Path, tiny_encoder) -> None:
    rows = [{"query": f"q{i}", "positive": f"pos {i}", "negatives": [f"neg {i} a", f"neg {i} b"]} for i in range(12)]
    dm = QAPairDataModule(train_path=str(write_jsonl(tmp_path / "t.jsonl", rows)), batch_size=4, max_negatives=1)
    dm.tokenize(tiny_encoder)
    batch = next(iter(dm.train_dataloader()))
    assert len(batch.documents) == 4 + 4  # 4 positives, then one negative each
    assert len(batch.documents) - len(batch.queries) == 4  # the hard negatives follow the positives


@pytest.mark.parametrize("lengths", [[3, 3, 4, 9, 30], [5] * 7, [1, 2, 3, 50, 51, 52, 300], list(range(1, 12))])
def test_padding_groups_are_optimal(lengths: list[int]) -> None:
    def cost(bounds):
        return sum((end - start) * lengths[end - 1] for start, end in bounds)

    def all_splits(n, groups):  # every way to cut range(n) into at most `groups` contiguous pieces
        if groups == 1 or n == 0:
            return [[(0, n)]]
        splits = [[(0, n)]]
        for cut in range(1, n):
            splits += [[(0, cut)] + [(s + cut, e + cut) for s, e in rest] for rest in all_splits(n - cut, groups - 1)]
        return splits

    for groups in (1, 2, 3):
        bounds = padding_groups(lengths, groups)
        assert bounds[0][0] == 0 and bounds[-1][1] == len(lengths) and len(bounds) <= groups
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
        optimum = min(cost(s) for s in all_splits(len(lengths), groups))
        assert cost(bounds) <= optimum / 0.9 ** (groups - 1)  # optimal up to the 10%-per-group rule
    assert padding_groups([5] * 7, 4) == [(0, 7)]  # nothing to gain: one forward pass


def test_length_groups_leave_loss_and_gradients_unchanged(tmp_path: Path, tiny_model_path: str) -> None:
    from lit_embed.batch import Embedded
    from lit_embed.losses.mnrl import mnrl
    from lit_embed.models.encoder import Encoder

    rows = [{"query": f"q{i} " * (1 + i % 4), "positive": "code line\n" * (1 + (i * 7) % 40)} for i in range(16)]
    path = str(write_jsonl(tmp_path / "t.jsonl", rows))
    results = []
    for groups in (1, 4):
        encoder = Encoder(tiny_model_path).eval()  # no dropout: the two passes must be comparable
        dm = QAPairDataModule(train_path=path, batch_size=16, length_groups=groups, packing=False)
        dm.tokenize(encoder)
        batch = next(iter(dm.train_dataloader()))
        assert not encoder.packs(batch.documents) and batch.documents.length_groups == groups
        assert len(padding_groups(sorted(batch.documents.lengths), groups)) == (1 if groups == 1 else 3)
        loss = mnrl(Embedded(encoder(batch.queries), encoder(batch.documents)))
        loss.backward()
        results.append(
            (loss.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None})
        )
    (loss_1, grads_1), (loss_4, grads_4) = results
    torch.testing.assert_close(loss_4, loss_1, atol=1e-5, rtol=0)
    for name, grad in grads_1.items():
        torch.testing.assert_close(grads_4[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_too_little_data_for_one_batch(tmp_path: Path, tiny_encoder) -> None:
    dm = QAPairDataModule(train_path=str(write_jsonl(tmp_path / "small.jsonl", shared_doc_rows(3))), batch_size=8)
    with pytest.raises(DataFormatError, match=r"small\.jsonl: only 3 training pairs.*data\.batch_size=8"):
        dm.tokenize(tiny_encoder)


def test_missing_train_path() -> None:
    with pytest.raises(DataFormatError, match="data.train_path is not set"):
        QAPairDataModule().prepare_data()


def test_lightning_reshuffles_every_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import compose_train, tiny_run_overrides, write_toy_data

    from lit_embed.train import run
    from lit_embed.training.module import EmbeddingFinetuneModule

    seen: list[tuple[int, tuple[int, ...]]] = []

    def record(self, batch, batch_idx):
        queries = side_texts(batch.queries)
        seen.append((self.current_epoch, tuple(sorted(queries))))

    monkeypatch.setattr(EmbeddingFinetuneModule, "on_train_batch_start", record, raising=False)
    train, val = write_toy_data(tmp_path)
    overrides = {"trainer.max_epochs": 2, "trainer.max_steps": -1}
    run(compose_train(tiny_run_overrides(train, None, tmp_path / "run", **overrides)))
    epochs = [[rows for epoch, rows in seen if epoch == e] for e in (0, 1)]
    assert len(epochs[0]) == len(epochs[1]) == 6
    assert epochs[0] != epochs[1]
    assert sorted(q for rows in epochs[0] for q in rows) == sorted(q for rows in epochs[1] for q in rows)


def batch_tokens(batch) -> int:
    """The real tokens of a batch's queries and documents, packed or padded."""
    return sum(sum(side.lengths) for side in (batch.queries, batch.documents))


@pytest.mark.parametrize("packing", [True, False])
def test_a_token_budget_bounds_every_batch_and_keeps_every_row(tmp_path: Path, tiny_encoder, packing: bool) -> None:
    rows = shared_doc_rows(60)  # passages of 1 to 5 repeats: uneven lengths
    path = str(write_jsonl(tmp_path / "t.jsonl", rows))
    plain = QAPairDataModule(train_path=path, batch_size=16, use_all_docs=True, packing=packing)
    plain.tokenize(tiny_encoder)
    dm = QAPairDataModule(train_path=path, batch_size=16, use_all_docs=True, packing=packing, max_tokens_per_batch=150)
    dm.tokenize(tiny_encoder)
    batches = list(dm.train_dataloader())
    assert len(batches) > len(list(plain.train_dataloader()))
    assert max(batch_tokens(batch) for batch in batches) <= 150
    assert sorted(q for batch in batches for q in batch.query_ids) == sorted(plain.rows.query_ids.texts(range(60)))


def test_a_row_over_the_token_budget_is_refused_with_its_id_and_the_fix(tmp_path: Path, tiny_encoder) -> None:
    rows = shared_doc_rows(20)
    dm = QAPairDataModule(
        train_path=str(write_jsonl(tmp_path / "t.jsonl", rows)), batch_size=4, max_tokens_per_batch=20
    )
    with pytest.raises(
        LitEmbedError,
        match=r"t\.jsonl, line \d+: this training row holds \d+ tokens \(its query and 1 document\), more than "
        r"data\.max_tokens_per_batch=20\. Raise data\.max_tokens_per_batch to at least \d+",
    ):
        dm.tokenize(tiny_encoder)
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        QAPairDataModule(train_path="t.jsonl", max_tokens_per_batch=0)


def test_a_training_run_with_a_token_budget_takes_more_smaller_steps(tmp_path: Path) -> None:
    from helpers import compose_train, tiny_run_overrides, write_toy_data

    from lit_embed.train import run

    train, val = write_toy_data(tmp_path)  # 48 pairs: 6 batches of 8
    settings = {"data.max_tokens_per_batch": 120, "trainer.max_steps": -1, "trainer.max_epochs": 1}
    settings["load_best_model_at_end"] = "false"  # metrics.json's step is then the last one
    metrics = run(compose_train(tiny_run_overrides(train, val, tmp_path / "run", **settings)))
    assert metrics["final"]["step"] > 6


def test_every_lit_embed_data_module_declares_the_pair_data_interface() -> None:
    from lit_embed.data.datamodule import PairDataModule, StdlibDataModule, check_pair_data
    from lit_embed.data.multitask import MultiTaskDataModule

    for kind in (QAPairDataModule, StdlibDataModule, MultiTaskDataModule):
        check_pair_data(kind, "data")
    bare = PairDataModule()  # a data module of a user's own: every answer has a default
    assert (bare.val_dataset, bare.num_training_pairs, bare.source, bare.losses, bare.batch_size) == (None,) * 5
    assert not bare.mine and not bare.multi_positive and not bare.has_teacher_scores
    assert bare.task_modules() == [bare]
    assert bare.training_texts() == bare.skipped_records() == bare.data_identity() == {}


def test_the_flat_data_keys_are_the_three_settings_records(tmp_path: Path) -> None:
    """Every key of conf/data/qa_json.yaml belongs to exactly one record (which rows, how to batch, how to read), each
    record checks its own keys, and a key no record owns is refused naming the nearest."""
    import dataclasses

    from omegaconf import OmegaConf

    from lit_embed.config import CONFIG_DIR
    from lit_embed.data.settings import RECORDS, DataSettings, grouped

    owned = [field.name for record in RECORDS for field in dataclasses.fields(record)]
    assert len(owned) == len(set(owned)) and all(len(dataclasses.fields(record)) <= 8 for record in RECORDS)
    yaml_keys = set(OmegaConf.load(Path(CONFIG_DIR) / "data" / "qa_json.yaml")) - {"_target_"}
    assert yaml_keys == set(owned) == set(DataSettings.__annotations__)

    rows, batching, reading = grouped({"train_path": "t.jsonl", "batch_size": 8, "strict": True})
    assert (rows.train_path, batching.batch_size, reading.skip_policy.strict) == ("t.jsonl", 8, True)
    dm = QAPairDataModule(train_path="t.jsonl", batch_size="auto", mine=True)
    dm.batch_size = 32  # the default recipe's, set before training: checked as any batch size
    assert (dm.batch_size, dm.mine, dm.train_path, dm.row_settings.val_fraction) == (32, True, "t.jsonl", 0.0)
    with pytest.raises(ValueError, match="batch_size=0 is not allowed"):
        dm.batch_size = 0
    with pytest.raises(TypeError, match="'batch_sise' .*did you mean 'batch_size'"):
        QAPairDataModule(train_path="t.jsonl", batch_sise=8)


def test_a_data_module_that_is_not_lit_embeds_is_refused_naming_the_fix() -> None:
    from lightning.pytorch.demos.boring_classes import BoringDataModule

    from lit_embed.data.datamodule import check_pair_data

    with pytest.raises(LitEmbedError) as refused:
        check_pair_data(BoringDataModule(), "data")
    assert str(refused.value).startswith(
        "data: lightning.pytorch.demos.boring_classes.BoringDataModule is not a lit_embed data module. Derive it "
        "from lit_embed.data.datamodule.PairDataModule"
    )
