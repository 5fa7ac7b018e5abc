"""Decoder-only (LLM) embedders: what training embeds is what sentence-transformers embeds at inference.

The traps of these models are the pooling (the last token, after an EOS the tokenizer must append), the padding side
and the query instruction. Each test holds for the tiny BERT and the tiny Qwen3 decoder, padded left and right.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import compose_train, tiny_run_overrides, token_store, write_toy_data
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling
from test_cached_loss import assert_same, cached_gradients, collated_batch, plain_gradients

from lit_embed.batch import padding_groups
from lit_embed.models.encoder import Encoder
from lit_embed.models.tiny import DECODER_EOS, build_tiny_decoder
from lit_embed.train import run
from lit_embed.training.steps import mini_batches

INSTRUCTION = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
QUERIES = ["sort", "how do I sort a list of tuples by the second item?", "open a file", "x", "parse json " * 20]
DOCUMENTS = [
    "def f(): pass",
    "sorted(pairs, key=lambda p: p[1]) returns a new list ordered by each pair's second element",
    "with open(path) as f: data = f.read()",
    "json.loads(text) " * 30,
]
MAX_SEQ_LENGTH = 40  # the longest texts above are cut: truncation must keep what inference keeps (the EOS)


def test_tiny_decoder_is_shaped_like_qwen3_embedding(model_paths: dict[str, str]) -> None:
    model = SentenceTransformer(model_paths["decoder"], device="cpu")  # plain sentence-transformers, no lit_embed
    transformer, pooling, normalize = model[0], model[1], model[2]
    assert type(transformer.auto_model).__name__ == "Qwen3Model"
    assert isinstance(pooling, Pooling) and pooling.pooling_mode == "lasttoken"
    assert isinstance(normalize, Normalize)
    tokenizer = model.tokenizer
    assert tokenizer.padding_side == "left"
    eos = tokenizer.convert_tokens_to_ids(DECODER_EOS)
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == eos
    features = model.preprocess(["hi", "a longer text than hi"])
    assert features["input_ids"][:, -1].tolist() == [eos, eos]  # every text ends in the EOS, padding on the left
    assert features["attention_mask"][0].tolist()[0] == 0 and features["attention_mask"][:, -1].all()
    # Deterministic in its arguments, like the tiny BERT.
    again = build_tiny_decoder(Path(model_paths["decoder"]).parent / "again", dropout=0.0)
    first, second = (
        load_file(Path(model_paths["decoder"]) / "model.safetensors"),
        load_file(Path(again) / "model.safetensors"),
    )
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def training_embeddings(encoder: Encoder, texts: list[str], kind: str, length_groups: int) -> torch.Tensor:
    """What a training step embeds: texts tokenized once, stored unpadded, packed (``length_groups`` 0) or padded by
    the encoder in length groups."""
    side = token_store(texts, kind, encoder).packed(range(len(texts)), length_groups)
    if length_groups:
        groups = padding_groups(sorted(side.lengths), length_groups)
        assert (len(groups) > 1) == (length_groups > 1), "texts this varied in length should be split"
    return encoder(side)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_training_embeddings_equal_encode_query_and_encode_document(
    model_paths: dict[str, str], kind: str, side: str, tmp_path: Path
) -> None:
    encoder = Encoder(model_paths[kind], max_seq_length=MAX_SEQ_LENGTH, query_prompt=INSTRUCTION, document_prompt="")
    encoder.model.tokenizer.padding_side = side
    encoder.eval()
    encoder.save(tmp_path / "model")  # inference loads the export with plain sentence-transformers
    reference = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    assert reference.tokenizer.padding_side == side and reference.prompts["query"] == INSTRUCTION
    # One inference batch of texts of different lengths, padded to its longest, as encode pads it.
    expected = {
        "query": reference.encode_query(QUERIES, convert_to_tensor=True),
        "document": reference.encode_document(DOCUMENTS, convert_to_tensor=True),
    }
    # BERT's positions are absolute and do not skip left padding: its embeddings then depend on how much padding a
    # batch adds, in sentence-transformers as well, so only equal padding (one group) can equal it. Models that
    # pool from the mask with causal or position-free padding (the decoder, or BERT padded right) are independent
    # of the batch, and the length groups must not change them.
    # Packed too (0): BERT padded left cannot pack (its probe finds the positions shifted) and so pads in groups.
    left_bert = (kind, side) == ("encoder", "left")
    assert bool(encoder.packing_unsupported) is left_bert
    groups = (1,) if left_bert else (0, 1, 3)
    with torch.no_grad():
        for texts, text_kind in ((QUERIES, "query"), (DOCUMENTS, "document")):
            for length_groups in groups:
                got = training_embeddings(encoder, texts, text_kind, length_groups)
                torch.testing.assert_close(
                    got, expected[text_kind], atol=1e-5, rtol=0, msg=f"{text_kind} {length_groups}"
                )


def test_truncation_keeps_the_eos_as_sentence_transformers_does(model_paths: dict[str, str]) -> None:
    encoder = Encoder(model_paths["decoder"], max_seq_length=MAX_SEQ_LENGTH, query_prompt=INSTRUCTION)
    eos = encoder.model.tokenizer.convert_tokens_to_ids(DECODER_EOS)
    store = token_store(QUERIES, "query", encoder)
    ids = [store.features["input_ids"].row(i).astype(int) for i in range(len(QUERIES))]
    assert [int(row[-1]) for row in ids] == [eos] * len(QUERIES)
    assert len(ids[-1]) == MAX_SEQ_LENGTH  # the long query was cut, and its EOS kept
    inference = encoder.model.preprocess([QUERIES[-1]], prompt=INSTRUCTION)["input_ids"][0]
    assert ids[-1].tolist() == inference.tolist()
    for side in ("left", "right"):  # the padded batch still ends each row in its EOS, whichever side pads
        batch = store.packed(range(len(QUERIES))).padded(range(len(QUERIES)), side, encoder.pad_token_id)
        rows = zip(batch["input_ids"], batch["attention_mask"].bool(), strict=True)
        last = [int(ids[mask][-1]) for ids, mask in rows]
        assert last == [eos] * len(QUERIES), side


def test_left_padded_batches_are_padded_on_the_left(model_paths: dict[str, str]) -> None:
    encoder = Encoder(model_paths["decoder"])
    assert encoder.padding_side == "left"
    store = token_store(QUERIES[:3], "query", encoder)
    batch = store.packed([0, 1, 2]).padded(range(3), encoder.padding_side, encoder.pad_token_id)
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][:, 0].all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == encoder.pad_token_id).all()


def test_cached_loss_trims_left_padded_mini_batches(model_paths: dict[str, str]) -> None:
    """GradCache cuts a padded side into mini-batches that the encoder pads to their own longest text: with left
    padding the unused columns are the first ones, and the loss and gradients still equal the plain loss's."""
    encoder = Encoder(model_paths["decoder"]).eval()
    batch = collated_batch(encoder, size=12, negatives=1, length_groups=1)
    assert not encoder.packs(batch.documents)
    for chunk in mini_batches(batch.documents, 4, None, packs=False):
        mask = chunk.padded(range(len(chunk)), encoder.padding_side, encoder.pad_token_id)["attention_mask"]
        assert mask[:, 0].any() and mask[:, -1].all(), "a column of padding only was kept, or a token was cut"
    assert_same(cached_gradients(encoder, batch, 4), plain_gradients(encoder, batch))


def test_qwen3_embedding_config_composes_with_its_instruction() -> None:
    cfg = compose_train(["model=qwen3_embedding"])
    assert cfg.model._target_ == "lit_embed.models.encoder.Encoder"
    assert cfg.model.model_name_or_path == "Qwen/Qwen3-Embedding-0.6B"
    assert cfg.model.query_prompt == INSTRUCTION  # a real newline between the task and "Query:"
    assert cfg.model.document_prompt == ""
    assert cfg.model.dtype == "float32"  # saved in bf16; full finetuning keeps fp32 weights
    assert cfg.model.trust_remote_code is False and cfg.model.load_in_4bit is False


def test_train_app_finetunes_the_tiny_decoder_and_exports_a_plain_model(tmp_path: Path) -> None:
    train, val = write_toy_data(tmp_path, num_train=24, num_val=8)
    out = tmp_path / "run"
    overrides = tiny_run_overrides(train, val, out, load_best_model_at_end="false", **{"trainer.max_steps": 3})
    metrics = run(compose_train([o if o != "model=tiny" else "model=tiny_decoder" for o in overrides]))
    assert metrics["final"]["step"] == 3
    base = load_file(out / "base_model" / "model.safetensors")
    trained = load_file(out / "model" / "model.safetensors")
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    model = SentenceTransformer(str(out / "model"), device="cpu")  # loads without lit_embed
    assert model[1].pooling_mode == "lasttoken" and model.tokenizer.padding_side == "left"
    assert model.prompts["query"] == INSTRUCTION
    encoder = Encoder(str(out / "model"))
    torch.testing.assert_close(encoder.encode(QUERIES, "query"), model.encode_query(QUERIES, convert_to_tensor=True))


def test_a_tokenizer_without_a_padding_token_pads_with_its_eos(model_paths: dict[str, str], tmp_path: Path) -> None:
    """Llama- and Mistral-style tokenizers have no padding token: batching them must still work, and the export
    must batch in plain sentence-transformers."""
    model = SentenceTransformer(model_paths["decoder"], device="cpu")
    model.tokenizer.pad_token = None
    model.save(str(tmp_path / "no_pad"))
    with pytest.raises(ValueError, match="padding token"):  # what sentence-transformers does with such a model
        SentenceTransformer(str(tmp_path / "no_pad"), device="cpu").encode_query(QUERIES)
    encoder = Encoder(tmp_path / "no_pad", query_prompt=INSTRUCTION).eval()
    assert encoder.model.tokenizer.pad_token == DECODER_EOS
    with torch.no_grad():
        got = training_embeddings(encoder, QUERIES, "query", length_groups=3)
    encoder.save(tmp_path / "export")
    expected = SentenceTransformer(str(tmp_path / "export"), device="cpu").encode_query(QUERIES, convert_to_tensor=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
