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
