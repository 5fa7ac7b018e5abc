"""Adapter finetuning: identity start, frozen encoder with cached embeddings, exports for sentence-transformers
and LlamaIndex."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import compose_train, tiny_run_overrides, toy_split, trained_encoders, write_toy_data
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Dense

from lit_embed.errors import LitEmbedError
from lit_embed.models.adapted import AdaptedEncoder
from lit_embed.models.adapters import LinearAdapter, MLPAdapter
from lit_embed.models.embedding_cache import cache_path
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


def step_losses(out: Path) -> list[float]:
    """train/loss of every step, from the run's CSV log."""
    rows = csv.DictReader((out / "logs" / "version_0" / "metrics.csv").open())
    return [float(row["train/loss"]) for row in rows if row.get("train/loss")]


def assert_trained(metrics: dict, out: Path, steps: int = 18, per_epoch: int = 6) -> None:
    """metrics.json is what the run returned, its numbers are metrics, and training lowered the loss."""
    assert json.loads((out / "metrics.json").read_text()) == metrics
    for name in ("base", "final"):
        assert all(0 <= metrics[name][k] <= 1 for k in ("mrr@10", "ndcg@10", "map@100", "accuracy@1"))
    assert metrics["final"]["mrr@10"] >= metrics["base"]["mrr@10"] - 1e-9
    losses = step_losses(out)
    assert len(losses) == steps
    first, last = losses[:per_epoch], losses[-per_epoch:]
    assert sum(last) / per_epoch < sum(first) / per_epoch, f"the head did not learn: {losses}"


TEXTS = ["how do I parse json number 3?", "sort a list of tuples by key", "def helper_3():\n    return 3"]


def assert_export_matches(trained: AdaptedEncoder, model_dir: Path) -> SentenceTransformer:
    """model/, loaded by plain sentence-transformers, embeds as the trained encoder does (queries and documents)."""
    model = SentenceTransformer(str(model_dir), device="cpu")
    exported_q = model.encode_query(TEXTS, convert_to_tensor=True)
    exported_d = model.encode_document(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(exported_q, trained.encode(TEXTS, "query"), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(exported_d, trained.encode(TEXTS, "document"), atol=1e-5, rtol=1e-4)
    # ... and it is not the base model: the trained head maps queries.
    base_q = trained.base.encode(TEXTS, "query")
    assert (exported_q - base_q[:, : exported_q.shape[1]]).abs().max() > 1e-3
    return model


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
    assert (state["encoder.adapter.linear.weight"] - torch.eye(64)).abs().max() > 1e-3  # moved, not just rounded
    assert_trained(metrics, out)

    # The cache holds the frozen base model's embeddings of exactly the train and val texts.
    base = Encoder(str(out / "base_model"))
    for kind in ("query", "document"):
        splits = [toy_split(48), toy_split(20, offset=1000)]
        texts = [t for split in splits for t in (split.queries if kind == "query" else split.corpus).values()]
        expected = base.encode(texts, kind)
        cached = torch.cat(
            [torch.load(f, weights_only=True)["embeddings"] for f in sorted((tmp_path / "cache").glob(f"{kind}-*"))]
        )
        assert cached.shape == expected.shape == (48 + 20, 64)
        similarity = cached @ expected.T  # unit vectors: 1 where a cached row is a text's base embedding
        best = similarity.max(dim=1)
        assert torch.allclose(best.values, torch.ones(len(cached)), atol=1e-5)
        assert sorted(best.indices.tolist()) == list(range(len(texts))), "every text cached once"

    # A second run with the same data never runs the encoder: every embedding comes from the cache.
    def no_encoding(*args, **kwargs):
        raise AssertionError("the encoder ran although the embeddings are cached")

    monkeypatch.setattr(Encoder, "encode", no_encoding)
    # (Same output_dir: the tiny test model lives there, and its path is part of the cache key.)
    again = run(compose_train(adapter_overrides(tmp_path, "overwrite=true")))
    assert again == metrics


def test_exports_load_without_lit_embed_and_map_queries_only(tmp_path: Path, monkeypatch) -> None:
    trained = trained_encoders(monkeypatch)
    run(compose_train(adapter_overrides(tmp_path)))
    out = tmp_path / "run"
    (encoder,) = trained
    model = assert_export_matches(encoder, out / "model")
    # model/ holds the trained head: its one Dense is the adapter's weight.
    (dense,) = [m for m in model.modules() if isinstance(m, Dense)]
    torch.testing.assert_close(dense.linear.weight, encoder.adapter.linear.weight, atol=0, rtol=0)
    torch.testing.assert_close(  # documents pass the frozen base unchanged
        model.encode_document(TEXTS, convert_to_tensor=True), encoder.base.encode(TEXTS, "document"), atol=1e-6, rtol=0
    )
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
    torch.testing.assert_close(weight, encoder.adapter.linear.weight.detach(), atol=0, rtol=0)  # the last step's

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


def test_both_transform_with_another_size(tmp_path: Path, monkeypatch) -> None:
    trained = trained_encoders(monkeypatch)
    metrics = run(compose_train(adapter_overrides(tmp_path, "adapter.out_dim=16")))
    out = tmp_path / "run"
    model = SentenceTransformer(str(out / "model"), device="cpu")
    assert model.encode_query(["q"]).shape == (1, 16) and model.encode_document(["d"]).shape == (1, 16)
    assert not (out / "llamaindex_adapter").exists()  # LlamaIndex maps queries only: nothing it could load
    assert metrics["final"]["mrr@10"] > 0

    # The first 16 of 64 base dimensions rank the toy data poorly; the trained 64 -> 16 head ranks it far better.
    assert_trained(metrics, out)
    assert metrics["base"]["mrr@10"] < 0.7, metrics["base"]
    assert metrics["final"]["mrr@10"] > metrics["base"]["mrr@10"] + 0.2, (metrics["base"], metrics["final"])
    assert metrics["final"]["ndcg@10"] > metrics["base"]["ndcg@10"] and metrics["final"]["step"] == 18
    (encoder,) = trained
    assert encoder.transform == "both"
    weight = encoder.adapter.linear.weight.detach()
    assert weight.shape == (16, 64) and (weight - torch.eye(16, 64)).abs().max() > 1e-2
    exported = assert_export_matches(encoder, out / "model")
    (dense,) = [m for m in exported.modules() if isinstance(m, Dense)]
    torch.testing.assert_close(dense.linear.weight, weight, atol=0, rtol=0)


def test_mlp_adapter_run(tmp_path: Path, monkeypatch) -> None:
    trained = trained_encoders(monkeypatch)
    metrics = run(compose_train(adapter_overrides(tmp_path, "adapter=mlp", "adapter.hidden_dim=32")))
    config = json.loads((tmp_path / "run" / "llamaindex_adapter" / "config.json").read_text())
    assert config == {
        "in_features": 64,
        "hidden_features": 32,
        "out_features": 64,
        "bias": True,
        "activation_fn_str": "relu",
        "add_residual": True,
    }

    out = tmp_path / "run"
    assert_trained(metrics, out)
    (encoder,) = trained
    head = {k: v.detach() for k, v in encoder.adapter.state_dict().items()}
    assert float(head["residual_weight"]) != 0.0, "the residual branch trained away from the identity start"
    # The LlamaIndex file and the checkpoint hold the trained head's weights, every one of them.
    from lit_embed.training.checkpoint_io import load_checkpoint

    saved = torch.load(out / "llamaindex_adapter" / "pytorch_model.bin", weights_only=True)
    checkpoint = load_checkpoint(out / "checkpoints" / "last.ckpt")["state_dict"]
    assert (
        set(saved)
        == set(head)
        == {"linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias", "residual_weight"}
    )
    for name, value in head.items():
        torch.testing.assert_close(saved[name], value, atol=0, rtol=0)
        torch.testing.assert_close(checkpoint[f"encoder.adapter.{name}"], value, atol=0, rtol=0)
    # model/ (the residual MLP written as plain Dense modules) embeds as the trained encoder does.
    assert_export_matches(encoder, out / "model")


def test_cache_key_follows_the_prompt(tmp_path: Path, tiny_model_path: str) -> None:
    def key(prompt: str | None) -> Path:
        return cache_path(Encoder(tiny_model_path, query_prompt=prompt), ["a text"], "query", tmp_path)

    assert key(None) == key(None)
    assert key(None) != key("query: ")


def test_cache_key_follows_every_byte_of_the_weights(tmp_path: Path, tiny_model_path: str) -> None:
    """Two finetunes of one model may differ anywhere, e.g. only in the last element of the largest weight."""
    texts = ["a text", "another text"]
    same, changed = Encoder(tiny_model_path), Encoder(tiny_model_path)

    def key(encoder: Encoder, kind: str = "query", some: list[str] = texts) -> Path:
        return cache_path(encoder, some, kind, tmp_path)

    assert key(same) == key(changed)  # identical weights, same key
    assert key(same) != key(same, "document")
    assert key(same) != key(same, some=texts[:1])

    name, weight = max(changed.state_dict().items(), key=lambda item: item[1].numel())
    assert weight.numel() * weight.element_size() > 100 * 4096, name  # the last element is far past 4096 bytes
    original = weight.view(-1)[-1].item()
    with torch.no_grad():
        weight.view(-1)[-1] += 1e-3
    assert not torch.equal(weight, same.state_dict()[name])
    assert key(changed) != key(same), f"the cache key ignores the end of {name}"
    assert key(changed, "document") != key(same, "document")
    with torch.no_grad():
        weight.view(-1)[-1] = original  # back to the very same bytes: the same key again
    assert key(changed) == key(same)
    # A base that differs only in one element past the first 4096 bytes of a small tensor counts as well.
    small_name, small = next((n, t) for n, t in changed.state_dict().items() if 1024 < t.numel() < 100_000)
    with torch.no_grad():
        small.view(-1)[1024 + 1] += 1.0
    assert key(changed) != key(same), small_name


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
def test_adapter_on_precomputed_vectors(tmp_path: Path, tiny_model_path: str, parquet: bool, monkeypatch) -> None:
    overrides = adapter_overrides(tmp_path)  # writes the toy data
    queries, documents = write_vectors(tmp_path, Encoder(tiny_model_path), parquet)
    overrides += ["model=precomputed", f"model.query_embeddings={queries}", f"model.document_embeddings={documents}"]
    trained = trained_encoders(monkeypatch)
    metrics = run(compose_train(overrides))
    out = tmp_path / "run"
    assert metrics["final"]["step"] == 18
    assert (out / "model" / "adapter.safetensors").is_file() and (out / "llamaindex_adapter" / "config.json").is_file()

    assert_trained(metrics, out)
    (encoder,) = trained
    weight = encoder.adapter.linear.weight.detach()
    assert (weight - torch.eye(64)).abs().max() > 1e-3
    # The head alone is saved: it loads and holds the trained weight, as do the LlamaIndex file and the checkpoint.
    head = load_file(out / "model" / "adapter.safetensors")
    assert set(head) == {"linear.weight"}
    torch.testing.assert_close(head["linear.weight"], weight, atol=0, rtol=0)
    assert json.loads((out / "model" / "adapter_config.json").read_text()) == encoder.config["adapter"]
    assert "holds the head alone" in (out / "model" / "README.md").read_text()  # the card: no text model to load
    llamaindex = torch.load(out / "llamaindex_adapter" / "pytorch_model.bin", weights_only=True)
    torch.testing.assert_close(llamaindex["linear.weight"], weight, atol=0, rtol=0)
    # Applied to the precomputed vectors, the saved head gives what the trained encoder gives.
    data = toy_split(20, offset=1000)
    texts, vectors = list(data.queries.values()), Encoder(tiny_model_path).encode(list(data.queries.values()), "query")
    torch.testing.assert_close(encoder.encode(texts, "query"), vectors @ head["linear.weight"].T, atol=1e-5, rtol=1e-4)


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
