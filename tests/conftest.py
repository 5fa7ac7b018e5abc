"""Shared fixtures: a tiny random-init sentence-transformers model, built once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    from lit_embed.models.tiny import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture()
def tiny_encoder(tiny_model_path: str):
    from lit_embed.models.encoder import Encoder

    return Encoder(tiny_model_path)


@pytest.fixture(scope="session")
def model_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny BERT and a tiny Qwen3 decoder without dropout, so two forward passes give the same embeddings."""
    from lit_embed.models.tiny import build_tiny_bert, build_tiny_decoder

    root = tmp_path_factory.mktemp("models")
    return {
        "encoder": build_tiny_bert(root / "bert", dropout=0.0),
        "decoder": build_tiny_decoder(root / "qwen3", dropout=0.0),
    }


@pytest.fixture(scope="session")
def tiny_cross_encoder_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random-init cross-encoder with one score (a reranker's starting point)."""
    from lit_embed.models.tiny import build_tiny_cross_encoder

    return build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny_reranker") / "model", seed=3)
