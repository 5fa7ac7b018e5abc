"""Adapter finetuning: identity start, frozen encoder with cached embeddings, exports for sentence-transformers
and LlamaIndex."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import compose_train, tiny_run_overrides, write_toy_data
from sentence_transformers import SentenceTransformer

from lit_embed.errors import LitEmbedError
from lit_embed.models.adapted import AdaptedEncoder
from lit_embed.models.adapters import LinearAdapter, MLPAdapter
from lit_embed.models.encoder import Encoder
from lit_embed.models.saving import dense_modules
from lit_embed.train import run

ADAPTERS = {
    "linear": lambda: LinearAdapter(16),
    "linear_bias": lambda: LinearAdapter(16, bias=True),
    "linear_smaller": lambda: LinearAdapter(16, out_dim=8),
    "mlp_residual": lambda: MLPAdapter(16, hidden_dim=32),
    "mlp_plain_tanh": lambda: MLPAdapter(16, hidden_dim=32, activation="tanh", residual=False),
}


def test_adapters_start_as_the_identity() -> None:
    x = torch.randn(5, 16)
    torch.testing.assert_close(LinearAdapter(16)(x), x)
    torch.testing.assert_close(LinearAdapter(16, bias=True)(x), x)
    torch.testing.assert_close(LinearAdapter(16, out_dim=8)(x), x[:, :8])
    torch.testing.assert_close(MLPAdapter(16, hidden_dim=32)(x), x)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_dense_export_computes_the_adapter(name: str) -> None:
    torch.manual_seed(0)
    adapter = ADAPTERS[name]()
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.3 * torch.randn_like(p))  # away from the identity, residual weight included
    x = torch.randn(7, 16)
    features = {"sentence_embedding": x}
    for module in dense_modules(adapter):
        features = module(features)
    torch.testing.assert_close(features["sentence_embedding"], adapter(x).detach(), atol=1e-5, rtol=1e-5)


def test_residual_mlp_with_another_activation_is_refused() -> None:
    with pytest.raises(LitEmbedError, match="activation=relu"):
        dense_modules(MLPAdapter(16, hidden_dim=8, activation="tanh"))


def test_query_transform_needs_matching_sizes(tiny_model_path: str) -> None:
    with pytest.raises(LitEmbedError, match="adapter.transform=both"):
        AdaptedEncoder(Encoder(tiny_model_path), lambda in_dim: LinearAdapter(in_dim, 8, transform="query"), None)


def adapter_overrides(tmp_path: Path, *extra: str) -> list[str]:
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "run"
    cache = tmp_path / "cache"
    values = {"trainer.max_epochs": 3, "trainer.max_steps": -1, "optimizer.lr": 1e-2, "load_best_model_at_end": "false"}
    overrides = tiny_run_overrides(train, val, out, **values) + ["method=adapter", f"method.encoder.cache_dir={cache}"]
    return overrides + list(extra)


def test_adapter_run_trains_only_the_head_and_reuses_the_cache(tmp_path: Path, monkeypatch) -> None:
    metrics = run(compose_train(adapter_overrides(tmp_path)))
    out = tmp_path / "run"
    assert metrics["final"]["step"] == 18  # 3 epochs of 48 pairs in batches of 8
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert cached == ["document", "document", "query", "query"]  # train and val, each kind once

    from lit_embed.training.checkpoint_io import load_checkpoint

    state = load_checkpoint(out / "checkpoints" / "last.ckpt")["state_dict"]
    assert set(state) == {"encoder.adapter.linear.weight"}  # the frozen encoder is not checkpointed
    assert not torch.equal(state["encoder.adapter.linear.weight"], torch.eye(64))

    # A second run with the same data never runs the encoder: every embedding comes from the cache.
    def no_encoding(*args, **kwargs):
        raise AssertionError("the encoder ran although the embeddings are cached")

    monkeypatch.setattr(Encoder, "encode", no_encoding)
    # (Same output_dir: the tiny test model lives there, and its path is part of the cache key.)
    again = run(compose_train(adapter_overrides(tmp_path, "overwrite=true")))
    assert again == metrics


def test_exports_load_without_lit_embed_and_map_queries_only(tmp_path: Path) -> None:
    run(compose_train(adapter_overrides(tmp_path)))
    out = tmp_path / "run"
    texts = ["how do I parse json number 3?", "def helper_3():\n    return 3"]
    script = (
        "import sys, json, torch\n"
        "from sentence_transformers import SentenceTransformer\n"
        "texts = json.loads(sys.argv[3])\n"
        "model, base = SentenceTransformer(sys.argv[1], device='cpu'), SentenceTransformer(sys.argv[2], device='cpu')\n"
        "out = {'q': model.encode_query(texts, convert_to_tensor=True),\n"
        "       'd': model.encode_document(texts, convert_to_tensor=True),\n"
        "       'base_q': base.encode_query(texts, convert_to_tensor=True),\n"
        "       'base_d': base.encode_document(texts, convert_to_tensor=True),\n"
        "       'lit_embed_loaded': any(m.startswith('lit_embed') for m in sys.modules)}\n"
        "torch.save(out, sys.argv[4])\n"
    )
    result = tmp_path / "emb.pt"
    cmd = [sys.executable, "-c", script, str(out / "model"), str(out / "base_model"), json.dumps(texts), str(result)]
    subprocess.run(cmd, check=True)
    emb = torch.load(result, weights_only=True)
    assert not emb["lit_embed_loaded"]
    torch.testing.assert_close(emb["d"], emb["base_d"], atol=1e-6, rtol=0)  # stored document vectors stay valid

    from lit_embed.training.checkpoint_io import load_checkpoint

    weight = load_checkpoint(out / "checkpoints" / "last.ckpt")["state_dict"]["encoder.adapter.linear.weight"]
    torch.testing.assert_close(emb["q"], emb["base_q"] @ weight.T, atol=1e-5, rtol=0)

    # Any adapter checkpoint exports the same model.
    exported = tmp_path / "from_ckpt"
    subprocess.run(
        [sys.executable, "-m", "lit_embed.export", str(out / "checkpoints" / "last.ckpt"), str(exported)], check=True
    )
    from_ckpt = SentenceTransformer(str(exported), device="cpu").encode_query(texts, convert_to_tensor=True)
    torch.testing.assert_close(from_ckpt, emb["q"], atol=1e-6, rtol=0)

    # LlamaIndex's AdapterEmbeddingModel(base, path, adapter_cls=LinearLayer) reads exactly these two files.
    llamaindex = out / "llamaindex_adapter"
    assert json.loads((llamaindex / "config.json").read_text()) == {
        "in_features": 64,
        "out_features": 64,
        "bias": False,
    }
    state = torch.load(llamaindex / "pytorch_model.bin", weights_only=True)
    assert set(state) == {"linear.weight"} and torch.equal(state["linear.weight"], weight)


def test_both_transform_with_another_size(tmp_path: Path) -> None:
    metrics = run(compose_train(adapter_overrides(tmp_path, "adapter.out_dim=16")))
    out = tmp_path / "run"
    model = SentenceTransformer(str(out / "model"), device="cpu")
    assert model.encode_query(["q"]).shape == (1, 16) and model.encode_document(["d"]).shape == (1, 16)
    assert not (out / "llamaindex_adapter").exists()  # LlamaIndex maps queries only: nothing it could load
    assert metrics["final"]["mrr@10"] > 0


def test_mlp_adapter_run(tmp_path: Path) -> None:
    run(compose_train(adapter_overrides(tmp_path, "adapter=mlp", "adapter.hidden_dim=32")))
    config = json.loads((tmp_path / "run" / "llamaindex_adapter" / "config.json").read_text())
    assert config == {
        "in_features": 64,
        "hidden_features": 32,
        "out_features": 64,
        "bias": True,
        "activation_fn_str": "relu",
        "add_residual": True,
    }


def test_cache_key_follows_the_prompt(tmp_path: Path, tiny_model_path: str) -> None:
    def cache_path(prompt: str | None) -> Path:
        encoder = AdaptedEncoder(Encoder(tiny_model_path, query_prompt=prompt), LinearAdapter, tmp_path)
        return encoder._cache_path(["a text"], "query")

    assert cache_path(None) == cache_path(None)
    assert cache_path(None) != cache_path("query: ")


def write_vectors(tmp_path: Path, encoder: Encoder, parquet: bool) -> tuple[Path, Path]:
    """Embeds every query and document of the toy files, as a hosted embedding API would, and writes them."""
    from lit_embed.data.formats import load_dataset

    files = []
    for kind in ("query", "document"):
        ids, texts = [], []
        for split in ("train.json", "val.json"):
            data = load_dataset(tmp_path / split)
            table = data.queries if kind == "query" else data.corpus
            ids += list(table)
            texts += list(table.values())
        vectors = encoder.encode(texts, kind).numpy()
        if parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            path = tmp_path / f"{kind}.parquet"
            pq.write_table(pa.table({"id": ids, "embedding": list(vectors)}), path)
        else:
            import numpy as np

            path = tmp_path / f"{kind}.npy"
            np.save(path, vectors)
            path.with_suffix(".json").write_text(json.dumps(ids))
        files.append(path)
    return files[0], files[1]


@pytest.mark.parametrize("parquet", [False, True])
def test_adapter_on_precomputed_vectors(tmp_path: Path, tiny_model_path: str, parquet: bool) -> None:
    overrides = adapter_overrides(tmp_path)  # writes the toy data
    queries, documents = write_vectors(tmp_path, Encoder(tiny_model_path), parquet)
    overrides += ["model=precomputed", f"model.query_embeddings={queries}", f"model.document_embeddings={documents}"]
    metrics = run(compose_train(overrides))
    out = tmp_path / "run"
    assert metrics["final"]["step"] == 18
    assert (out / "model" / "adapter.safetensors").is_file() and (out / "llamaindex_adapter" / "config.json").is_file()


def test_precomputed_vectors_must_cover_every_id(tmp_path: Path, tiny_model_path: str) -> None:
    overrides = adapter_overrides(tmp_path)
    queries, documents = write_vectors(tmp_path, Encoder(tiny_model_path), parquet=False)
    ids = json.loads(queries.with_suffix(".json").read_text())
    queries.with_suffix(".json").write_text(json.dumps(["renamed"] + ids[1:]))
    overrides += ["model=precomputed", f"model.query_embeddings={queries}", f"model.document_embeddings={documents}"]
    with pytest.raises(LitEmbedError, match=r"query\.npy: no vector for query id 'q0' of .*train\.json"):
        run(compose_train(overrides))
    queries.with_suffix(".json").write_text(json.dumps(ids))
    with pytest.raises(LitEmbedError, match="use it with method=adapter"):
        run(compose_train([o for o in overrides if not o.startswith("method")]))
