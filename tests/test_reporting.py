"""What a run reports: the PNG plot, pairs/s in the progress bar, other loggers, and the Python API."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from helpers import compose_train, tiny_run_overrides, write_toy_data

import lit_embed
from lit_embed.train import run
from lit_embed.training.callbacks.progress import PairsPerSecond, TrainingPlot, plot_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_run_writes_the_training_plot(tmp_path: Path) -> None:
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "run"
    run(compose_train(tiny_run_overrides(train, val, out, **{"eval.evaluation_steps": 2})))
    assert (out / "training.png").read_bytes().startswith(PNG_MAGIC)


def test_plot_draws_loss_and_metrics(tmp_path: Path) -> None:
    import matplotlib.image

    history = [{"step": s, "metrics": {"mrr@10": 0.5 + s / 100, "ndcg@10": 0.6 + s / 100}} for s in (0, 5, 10)]
    with_val = plot_run([(1, 2.0), (2, 1.5)], history, ("mrr@10", "ndcg@10"), tmp_path / "a.png")
    without = plot_run([(1, 2.0), (2, 1.5)], [], ("mrr@10",), tmp_path / "b.png")
    # Two panels (loss, validation) are twice as wide as the loss panel alone.
    assert matplotlib.image.imread(with_val).shape[1] == 2 * matplotlib.image.imread(without).shape[1]


def test_plot_keeps_the_curve_across_a_resume() -> None:
    plot = TrainingPlot()
    plot.load_state_dict({"losses": [[1, 2.0], [2, 1.0]]})
    assert plot.state_dict() == {"losses": [(1, 2.0), (2, 1.0)]}


def test_progress_bar_shows_pairs_per_second(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    original = PairsPerSecond.on_train_batch_end

    def spy(self, trainer, *args):
        original(self, trainer, *args)
        seen.update(trainer.progress_bar_metrics)

    monkeypatch.setattr(PairsPerSecond, "on_train_batch_end", spy)
    train, val = write_toy_data(tmp_path)
    run(compose_train(tiny_run_overrides(train, val, tmp_path / "run")))
    assert seen.get("pairs/s", 0) > 0


def test_tensorboard_logger(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "run"
    run(compose_train(tiny_run_overrides(train, val, out) + ["logger=tensorboard"]))
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))


def test_mlflow_logger_config(tmp_path: Path) -> None:
    cfg = compose_train(tiny_run_overrides(tmp_path / "t.json", None, tmp_path / "run") + ["logger=mlflow"])
    assert cfg.logger._target_ == "lightning.pytorch.loggers.MLFlowLogger"
    assert cfg.logger.tracking_uri == f"file:{tmp_path / 'run'}/mlruns"
    if importlib.util.find_spec("mlflow") is None:
        pytest.skip("mlflow is not installed (pip install mlflow)")


def test_python_api(tmp_path: Path) -> None:
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "api"
    metrics = lit_embed.finetune(
        str(train), str(val), model="tiny", batch_size=8, output_dir=str(out), overrides=["trainer.max_steps=2"]
    )
    assert set(metrics) == {"base", "final"}
    assert (out / "model" / "modules.json").is_file() and (out / "metrics.json").is_file()
