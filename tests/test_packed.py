"""Packed batches: every text unpadded in one row, with the embeddings, loss and gradients of padded batches."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import compose_train, tiny_run_overrides, write_toy_data

from lit_embed.batch import PackedTexts
from lit_embed.data.datamodule import QAPairDataModule
from lit_embed.losses.mnrl import MultipleNegativesRankingLoss
from lit_embed.models.encoder import Encoder
from lit_embed.train import run
from lit_embed.training.steps import GradCache, plain_step

TEXTS = [
    "how do I read a file?",
    "def read(path):\n    return open(path).read()  # a longer text, with many more tokens than the first",
    "x",
    "sort a list of numbers in place, largest first",
]


def packed_of(encoder: Encoder, texts: list[str], kind: str = "document") -> PackedTexts:
    return PackedTexts.from_features(encoder.tokenize(texts, kind))


@pytest.mark.parametrize("mode", ["mean", "cls", "max", "lasttoken"])
@pytest.mark.parametrize("include_prompt", [True, False])
def test_packed_embeddings_equal_padded_ones(model_paths, mode: str, include_prompt: bool) -> None:
    encoder = Encoder(model_paths["encoder"], query_prompt="query: ")
    encoder.model[1].pooling_mode, encoder.model[1].include_prompt = mode, include_prompt
    for kind in ("query", "document"):
        padded = encoder.embed_features(encoder.tokenize(TEXTS, kind))
        packed = encoder(packed_of(encoder, TEXTS, kind))
        torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    assert encoder.packing_unsupported is None


def test_the_gpus_nested_tensor_attention_gives_the_padded_embeddings_too(model_paths, monkeypatch) -> None:
    from lit_embed.models import packed

    monkeypatch.setattr(packed, "attention_kind", lambda query, causal: "nested")  # as on a GPU without flash-attn
    encoder = Encoder(model_paths["encoder"])
    torch.testing.assert_close(
        encoder(packed_of(encoder, TEXTS)), encoder.embed_features(encoder.tokenize(TEXTS, "document"))
    )


def test_a_causal_decoder_packs_with_its_padded_embeddings(model_paths) -> None:
    encoder = Encoder(model_paths["decoder"])
    assert encoder.padding_side == "left"
    torch.testing.assert_close(
        encoder(packed_of(encoder, TEXTS)), encoder.embed_features(encoder.tokenize(TEXTS, "document"))
    )
    assert encoder.packing_unsupported is None


def write_pairs(path: Path, n: int = 24) -> Path:
    rows = [
        {
            "query": f"question {i}: " + "why " * (i % 7),
            "positive": f"answer {i} " + "because " * (3 * i % 11),
            "negatives": [f"a wrong answer {i} " + "no " * (i % 5)],
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def loss_and_gradients(encoder: Encoder, step, data: QAPairDataModule, indices: list[int]):
    encoder.zero_grad()
    value = step(encoder, data.collator(indices), MultipleNegativesRankingLoss())
    value.backward()
    return value.detach(), {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("step", [plain_step, GradCache(mini_batch_size=3)], ids=["plain", "grad_cache"])
@pytest.mark.parametrize(
    ("multi_positive", "checkpointing"), [(False, False), (True, False), (False, True)], ids=["", "multi", "ckpt"]
)
def test_packed_batches_give_the_padded_loss_and_gradients(
    tmp_path: Path, model_paths, step, multi_positive: bool, checkpointing: bool
) -> None:
    """With gradient checkpointing too: the packed attention is installed once, so a layer recomputed in backward
    attends within each text as in the forward pass."""
    encoder = Encoder(model_paths["encoder"], query_prompt="query: ")
    if checkpointing:
        encoder.enable_gradient_checkpointing()
    path = write_pairs(tmp_path / "train.jsonl")
    results = []
    for packing in (False, True):
        data = QAPairDataModule(train_path=str(path), batch_size=8, packing=packing, multi_positive=multi_positive)
        data.tokenize(encoder)
        indices = next(iter(data.batch_sampler()))
        batch = data.collator(indices)
        assert encoder.packs(batch.documents) is packing and encoder.packs(batch.queries) is packing
        results.append(loss_and_gradients(encoder, step, data, indices))
    (padded_loss, padded_grads), (packed_loss, packed_grads) = results
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    assert packed_grads.keys() == padded_grads.keys() and padded_grads
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(("model", "kind"), [("encoder", "per_text"), ("encoder", "nested"), ("decoder", "per_text")])
def test_rows_padded_to_a_bucket_give_the_padded_embeddings(model_paths, monkeypatch, model: str, kind: str) -> None:
    """A compiled encoder's packed rows are padded to a multiple of 64 tokens with a text of padding of their own:
    the real texts' embeddings are unchanged, for every attention kind."""
    from lit_embed.models import packed as packed_module

    monkeypatch.setattr(packed_module, "attention_kind", lambda query, causal: kind)
    encoder = Encoder(model_paths[model])
    encoder.packed_bucket = 64  # as method.compile=true sets it, without the compilation
    assert encoder.packing_unsupported is None  # its probe runs before the rows are recorded
    rows: list[int] = []
    embeddings = encoder.model[0].auto_model.get_input_embeddings()
    embeddings.register_forward_pre_hook(lambda module, args: rows.append(args[0].size(1)))
    packed = packed_of(encoder, TEXTS)
    assert packed.input_ids.size(1) % 64
    torch.testing.assert_close(
        encoder(packed), encoder.embed_features(encoder.tokenize(TEXTS, "document")), atol=1e-5, rtol=1e-5
    )
    assert rows[0] % 64 == 0 and rows[0] - packed.input_ids.size(1) < 64
    bucketed = packed.padded_to_multiple(64, 0)
    assert len(bucketed) == len(packed) + 1 and bucketed.position_ids[0, -1] == bucketed.lengths[-1] - 1
    assert packed.padded_to_multiple(packed.input_ids.size(1), 0) is packed  # already a multiple: as it is


def test_a_compiled_encoder_packs_with_the_eager_loss_and_gradients_and_no_recompiles(tmp_path: Path, model_paths):
    from torch._dynamo.utils import counters

    eager, compiled = Encoder(model_paths["encoder"]), Encoder(model_paths["encoder"])
    compiled.compile_transformer()
    eager.eval(), compiled.eval()
    data = QAPairDataModule(train_path=str(write_pairs(tmp_path / "train.jsonl", n=48)), batch_size=8)
    data.tokenize(eager)
    batches = [indices for indices, _ in zip(data.batch_sampler(), range(3), strict=False)]
    graphs = []
    for indices in batches:  # three batches of other lengths
        expected = loss_and_gradients(eager, plain_step, data, indices)
        got = loss_and_gradients(compiled, plain_step, data, indices)
        torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
        for name, grad in expected[1].items():
            torch.testing.assert_close(got[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == graphs[2] == graphs[0], graphs  # compiled once, for every length


def test_packed_texts_split_into_runs_of_texts(model_paths) -> None:
    encoder = Encoder(model_paths["encoder"])
    packed = packed_of(encoder, TEXTS)
    runs = packed.split([3, 1])
    assert [len(run) for run in runs] == [3, 1]
    assert [run.lengths for run in runs] == [packed.lengths[:3], packed.lengths[3:]]
    assert runs[1].cu_seqlens.tolist() == [0, packed.lengths[3]]
    assert torch.equal(torch.cat([run.input_ids for run in runs], dim=1), packed.input_ids)
    torch.testing.assert_close(torch.cat([encoder(run) for run in runs]), encoder(packed))


def test_packing_auto_packs_where_the_encoder_can_and_true_says_why_it_cannot(
    tmp_path: Path, model_paths, caplog
) -> None:
    encoder = Encoder(model_paths["encoder"])
    path = write_pairs(tmp_path / "train.jsonl")
    auto = QAPairDataModule(train_path=str(path), batch_size=8)
    auto.tokenize(encoder)
    assert auto.collator.length_groups == 0
    off = QAPairDataModule(train_path=str(path), batch_size=8, packing=False)
    off.tokenize(encoder)
    assert off.collator.length_groups == 4

    encoder.model[1].pooling_mode = "weightedmean"
    del encoder.packing_unsupported  # asked again for the new pooling
    asked = QAPairDataModule(train_path=str(path), batch_size=8, packing=True)
    with caplog.at_level(logging.WARNING):
        asked.tokenize(encoder)
    assert asked.collator.length_groups == 4
    assert "data.packing=true: this encoder cannot embed packed texts: its pooling" in caplog.text

    compiled = QAPairDataModule(train_path=str(path), batch_size=8)
    encoder = Encoder(model_paths["encoder"])
    encoder.compile_transformer()
    compiled.tokenize(encoder)  # the compiled model runs packed rows too
    assert compiled.collator.length_groups == 0


def test_a_run_with_packed_batches_trains_and_exports(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "run"
    metrics = run(compose_train(tiny_run_overrides(train, val, out)))  # packing=auto packs this model
    assert "batches packed, no padding" in caplog.text
    assert metrics["final"]["step"] >= 0 and (out / "model" / "modules.json").is_file()


@pytest.mark.parametrize(("prompt", "calls"), [(None, 1), ("query: ", 2)])
def test_queries_and_documents_share_one_forward_pass_when_their_prompts_allow(
    tmp_path: Path, model_paths, prompt: str | None, calls: int
) -> None:
    encoder = Encoder(model_paths["encoder"], query_prompt=prompt)
    data = QAPairDataModule(train_path=str(write_pairs(tmp_path / "train.jsonl")), batch_size=8, packing=True)
    data.tokenize(encoder)
    batch = data.collator(next(iter(data.batch_sampler())))
    seen = []

    def counting(packed: PackedTexts) -> torch.Tensor:
        seen.append(len(packed))
        return encoder(packed)

    embedded = batch.embed(counting)
    assert len(seen) == calls and sum(seen) == len(batch.queries) + len(batch.documents)
    torch.testing.assert_close(embedded.queries, encoder(batch.queries))
    torch.testing.assert_close(embedded.documents, encoder(batch.documents))
