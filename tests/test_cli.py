"""The LightningCLI entry point (``lit-embed fit``) and ``lit-embed-eval``, on the tiny model and the toy data."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, compose_train, tiny_run_overrides, write_toy_data
from safetensors.torch import load_file

from lit_embed import cli, evaluate
from lit_embed.data.formats import load_dataset
from lit_embed.data.settings import RECORDS
from lit_embed.evaluation.retrieval import evaluate_encoder
from lit_embed.models.encoder import Encoder
from lit_embed.train import run
from lit_embed.training.lifecycle import mark_run_folder
from lit_embed.training.optim import OPTIMIZER_DEFAULTS
from lit_embed.training.recipe import default_recipe

FULL = REPO / "conf" / "cli" / "full.yaml"
MINILM_PARAMETERS = 22_713_216  # all-MiniLM-L6-v2's trainable weights


@pytest.fixture(autouse=True)
def no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    # The apps get their arguments from the tests; LightningCLI warns when sys.argv holds pytest's too.
    monkeypatch.setattr(sys, "argv", ["lit-embed"])


def fit_args(train: Path, val: Path, model: str, out: Path, *extra: str) -> list[str]:
    """``lit-embed fit`` on conf/cli/full.yaml, reduced to a 3-step tiny-model CPU run on the toy data."""
    return [
        "fit",
        f"--config={FULL}",
        f"--model.encoder.init_args.model_name_or_path={model}",
        "--model.encoder.init_args.max_seq_length=128",
        "--model.optimizer.init_args.lr=1e-3",
        "--data=lit_embed.data.datamodule.QAPairDataModule",
        f"--data.train_path={train}",
        f"--data.val_path={val}",
        "--data.batch_size=8",
        "--trainer.max_steps=3",
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={out}",
        *extra,
    ]


def test_fit_trains_evaluates_and_exports(tmp_path: Path, tiny_model_path: str) -> None:
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "run"
    cli.main(fit_args(train, val, tiny_model_path, out, "--load_best_model_at_end=false"))

    metrics = json.loads((out / "metrics.json").read_text())
    # full.yaml merges as the Hydra app does: every α of conf/train.yaml is scored, the best exported.
    assert set(metrics) == {"base", "finetuned", "final", "merge"} and metrics["final"]["step"] == 3
    assert list(metrics["merge"]["alphas"]) == [str(a) for a in compose_train([]).merge.alphas]
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "checkpoints" / "step=3.ckpt").is_file()
    header = (out / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/lr", "val/mrr@10", "val/ndcg@10"} <= set(header)
    saved = yaml.safe_load((out / "logs" / "version_0" / "config.yaml").read_text())  # the run's full config
    assert saved["model"]["init_args"]["encoder"]["init_args"]["model_name_or_path"] == tiny_model_path


def test_fit_gives_the_same_model_as_the_hydra_app(tmp_path: Path, tiny_model_path: str) -> None:
    train, val = write_toy_data(tmp_path)
    cli.main(fit_args(train, val, tiny_model_path, tmp_path / "cli"))
    default_alphas = "[" + ",".join(str(a) for a in compose_train([]).merge.alphas) + "]"  # as full.yaml's
    overrides = {"trainer.max_steps": 3, "model.model_name_or_path": tiny_model_path, "merge.alphas": default_alphas}
    hydra_metrics = run(compose_train(tiny_run_overrides(train, val, tmp_path / "hydra", **overrides)))

    assert json.loads((tmp_path / "cli" / "metrics.json").read_text()) == hydra_metrics
    cli_weights = load_file(tmp_path / "cli" / "model" / "model.safetensors")
    hydra_weights = load_file(tmp_path / "hydra" / "model" / "model.safetensors")
    base_weights = load_file(Path(tiny_model_path) / "model.safetensors")
    assert cli_weights.keys() == hydra_weights.keys() == base_weights.keys()
    # The best step is a trained one, so equal exports mean equal training, not two copies of the base model.
    assert hydra_metrics["final"]["step"] > 0
    assert any(not torch.equal(weight, base_weights[name]) for name, weight in cli_weights.items())
    for name, weight in cli_weights.items():
        assert torch.equal(weight, hydra_weights[name]), name
    # Both write the same model card metadata (front matter), each with its run's wall time.
    cards = [(tmp_path / app / "model" / "README.md").read_text() for app in ("cli", "hydra")]
    assert cards[0].split("---\n")[1] == cards[1].split("---\n")[1]
    assert all("Wall time: " in card for card in cards)


def test_print_config_shows_every_class(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", f"--config={FULL}", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: lit_embed.training.module.EmbeddingFinetuneModule" in printed
    config = yaml.safe_load(printed)
    assert config["model"]["init_args"]["encoder"]["class_path"] == "lit_embed.models.encoder.Encoder"
    assert Path(config["model"]["init_args"]["encoder"]["init_args"]["model_name_or_path"]).is_dir()  # packaged
    # The default recipe's values for the stdlib job, written out (the Hydra app computes them).
    recipe = default_recipe(1500, MINILM_PARAMETERS)
    optimizer = config["model"]["init_args"]["optimizer"]["init_args"]
    assert optimizer["lr"] == recipe.lr
    assert (config["data"]["init_args"]["batch_size"], config["trainer"]["max_epochs"]) == (
        recipe.batch_size,
        recipe.epochs,
    )
    assert {key: optimizer[key] for key in OPTIMIZER_DEFAULTS if key != "lr"} == {
        key: value for key, value in OPTIMIZER_DEFAULTS.items() if key != "lr"
    }  # the module's defaults otherwise
    assert [c["class_path"].rsplit(".", 1)[1] for c in config["trainer"]["callbacks"]] == [
        "IREvaluationCallback",
        "StepCheckpoint",
        "WeightMerging",
        "PairsPerSecond",
        "TrainingPlot",
    ]
    assert config["trainer"]["plugins"][0]["class_path"].endswith("AtomicCheckpointIO")
    # Every data setting, at the settings records' defaults but for the recipe's batch and the job's seed.
    data = config["data"]["init_args"]
    defaults = {field.name: field.default for record in RECORDS for field in dataclasses.fields(record)}
    assert {key: data[key] for key in defaults} == {**defaults, "batch_size": recipe.batch_size, "seed": 42}


def test_finished_model_is_not_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run" / "model").mkdir(parents=True)
    mark_run_folder(tmp_path / "run")  # a finished run's folder
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", f"--config={FULL}", f"--trainer.default_root_dir={tmp_path / 'run'}"])
    assert exit_info.value.code == 2
    assert "already holds a finished model" in capsys.readouterr().err


def test_a_folder_of_the_users_is_refused_before_anything_loads(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", f"--config={FULL}", f"--trainer.default_root_dir={folder}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{folder} already holds files that a lit_embed run did not make (notes.txt)" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_a_data_module_that_is_not_lit_embeds_is_one_message_before_anything_loads(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(
            ["fit", f"--config={FULL}", "--data=lightning.pytorch.demos.boring_classes.BoringDataModule"]
            + [f"--trainer.default_root_dir={out}"]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--data: lightning.pytorch.demos.boring_classes.BoringDataModule is not a lit_embed data module" in err
    assert "Derive it from lit_embed.data.datamodule.PairDataModule" in err and "Traceback" not in err
    assert not out.exists()


def test_evaluate_json_equals_evaluate_encoder(
    tmp_path: Path, tiny_model_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, val = write_toy_data(tmp_path)
    evaluate.main([tiny_model_path, str(val), "--json", "--device=cpu"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == evaluate_encoder(Encoder(tiny_model_path), load_dataset(val))

    run_dir = tmp_path / "run"  # a run's output directory: its model/ is evaluated
    shutil.copytree(tiny_model_path, run_dir / "model")
    evaluate.main([str(run_dir), str(val), "--batch-size=4", "--device=cpu"])
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["metric", "value"]
    assert f"{printed['mrr@10']:.4f}" in table


@pytest.mark.parametrize("missing", ["model", "data", "not_a_model"])
def test_evaluate_bad_path_exits_2(
    tmp_path: Path, tiny_model_path: str, capsys: pytest.CaptureFixture[str], missing: str
) -> None:
    _, val = write_toy_data(tmp_path)
    (tmp_path / "empty").mkdir()
    model, data = {
        "model": (tmp_path / "nope", val),
        "data": (Path(tiny_model_path), tmp_path / "nope.json"),
        "not_a_model": (tmp_path / "empty", val),
    }[missing]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(model), str(data)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lit-embed-eval: error: ") and str(model if missing != "data" else data) in err


def test_evaluate_applies_an_adapter_exports_query_route(tmp_path: Path, tiny_model_path: str) -> None:
    from functools import partial

    from sentence_transformers import SentenceTransformer

    from lit_embed.evaluation.ir import DEFAULT_K, evaluate_embeddings
    from lit_embed.models.adapted import AdaptedEncoder
    from lit_embed.models.adapters import LinearAdapter
    from lit_embed.models.saving import to_sentence_transformers

    _, val = write_toy_data(tmp_path)
    adapted = AdaptedEncoder(Encoder(tiny_model_path), partial(LinearAdapter), cache_dir=None)
    torch.manual_seed(0)
    with torch.no_grad():  # a random head, so queries with and without it rank documents differently
        for p in adapted.adapter.parameters():
            p.copy_(torch.randn_like(p))
    model_dir = to_sentence_transformers(adapted, tmp_path / "run" / "model")

    dataset = load_dataset(val)
    model = SentenceTransformer(str(model_dir), device="cpu")
    query_ids, corpus_ids = list(dataset.queries), list(dataset.corpus)
    queries = model.encode_query([dataset.queries[q] for q in query_ids], convert_to_tensor=True)
    corpus = model.encode_document([dataset.corpus[d] for d in corpus_ids], convert_to_tensor=True)
    expected = evaluate_embeddings(queries, corpus, query_ids, corpus_ids, dataset.relevant_docs, DEFAULT_K)
    assert evaluate.evaluate(tmp_path / "run", val, device="cpu") == pytest.approx(expected, abs=1e-6)
