"""What a run reports: the PNG plot, pairs/s in the progress bar, other loggers, and the Python API."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import compose_train, tiny_run_overrides, write_toy_data

import lit_embed
from lit_embed.train import run
from lit_embed.training.callbacks import progress
from lit_embed.training.callbacks.progress import PairsPerSecond, TrainingPlot, plot_run
from lit_embed.training.module import EmbeddingFinetuneModule

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature and the chunk's CRC."""
    import zlib

    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and data[12:16] == b"IHDR", f"{path} is not a PNG"
    length = struct.unpack(">I", data[8:12])[0]
    assert struct.unpack(">I", data[16 + length : 20 + length])[0] == zlib.crc32(data[12 : 16 + length])
    assert data.endswith(b"IEND\xaeB`\x82"), f"{path} is cut short"
    return struct.unpack(">II", data[16:24])


def assert_drawn(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A whole PNG of ``size`` (width, height) pixels with something drawn on it; returns its pixels."""
    import matplotlib.image

    assert png_size(path) == size
    assert path.stat().st_size > 10_000, "a plot with axes, curves and labels is not a few bytes"
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (size[1], size[0])
    rgb = pixels[..., :3].reshape(-1, 3)
    assert (rgb < 0.9).any(axis=1).mean() > 0.01, "ink on the canvas"
    assert len(np.unique(rgb, axis=0)) > 20, "more than a couple of flat colours: lines, text, markers"
    return pixels


def test_run_writes_the_training_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = []
    monkeypatch.setattr(progress, "plot_run", lambda *args: drawn.append(args) or plot_run(*args))
    losses = []
    training_step = EmbeddingFinetuneModule.training_step
    monkeypatch.setattr(
        EmbeddingFinetuneModule,
        "training_step",
        lambda self, *a: losses.append(float(loss := training_step(self, *a))) or loss,
    )
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "run"
    run(compose_train(tiny_run_overrides(train, val, out, **{"eval.evaluation_steps": 2})))
    assert (out / "training.png").read_bytes().startswith(PNG_MAGIC)

    # Two panels (loss and validation), 6 x 4 inches each at 120 dpi.
    assert_drawn(out / "training.png", (1440, 480))
    ((curve, history, metrics, path),) = drawn
    assert path == out / "training.png" and metrics == ("mrr@10", "ndcg@10")
    # The curve drawn is the run's loss at each of its 4 optimizer steps; validation before, at 2 and at the end.
    assert [step for step, _ in curve] == [1, 2, 3, 4]
    assert [value for _, value in curve] == pytest.approx(losses, rel=1e-6)
    assert [h["step"] for h in history] == [0, 2, 4]
    assert all(0 <= h["metrics"][m] <= 1 for h in history for m in metrics)


def test_plot_draws_loss_and_metrics(tmp_path: Path) -> None:
    import matplotlib.image

    history = [{"step": s, "metrics": {"mrr@10": 0.5 + s / 100, "ndcg@10": 0.6 + s / 100}} for s in (0, 5, 10)]
    with_val = plot_run([(1, 2.0), (2, 1.5)], history, ("mrr@10", "ndcg@10"), tmp_path / "a.png")
    without = plot_run([(1, 2.0), (2, 1.5)], [], ("mrr@10",), tmp_path / "b.png")
    # Two panels (loss, validation) are twice as wide as the loss panel alone.
    assert matplotlib.image.imread(with_val).shape[1] == 2 * matplotlib.image.imread(without).shape[1]
    assert with_val == tmp_path / "a.png" and without == tmp_path / "b.png"
    assert_drawn(with_val, (1440, 480)) is not None and assert_drawn(without, (720, 480)) is not None
    # The validation panel is really drawn: the right half holds coloured curves, not an empty canvas.
    right = matplotlib.image.imread(with_val)[:, 720:, :3]
    assert (right.max(axis=2) - right.min(axis=2) > 0.3).sum() > 200, "coloured metric curves"
    # A different curve gives a different picture.
    other = plot_run([(1, 2.0), (2, 0.1)], [], ("mrr@10",), tmp_path / "c.png")
    assert not np.array_equal(matplotlib.image.imread(other), matplotlib.image.imread(without))


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
    assert math.isfinite(float(seen["pairs/s"])) and "train/loss" in seen


class LogSpy:
    """Stands in for the LightningModule: records what a callback logs."""

    def __init__(self) -> None:
        self.logged: list[tuple[str, float, dict]] = []

    def log(self, name: str, value: float, **kwargs) -> None:
        self.logged.append((name, value, kwargs))


def test_pairs_per_second_is_the_batch_pair_count_over_the_step_time(
    tiny_encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_cached_loss import collated_batch

    batch = collated_batch(tiny_encoder, size=12, negatives=1)  # 12 pairs, 24 documents (before the clock is faked)
    clock = iter([10.0, 10.5, 20.0, 20.25, 30.0, 30.1])  # start/end of three steps: 0.5 s, 0.25 s, 0.1 s
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    callback, module, trainer = PairsPerSecond(smoothing=0.5), LogSpy(), SimpleNamespace()
    assert len(batch) == 12 and len(batch.documents) == 24

    callback.on_train_batch_end(trainer, module, None, batch, 0)  # no start seen: nothing to time
    assert module.logged == []
    rates = []
    for step, pairs in enumerate([batch, batch, {"a": batch, "b": batch}]):  # the last: two tasks in one step
        callback.on_train_batch_start(trainer, module, pairs, step)
        callback.on_train_batch_end(trainer, module, None, pairs, step)
        rates.append(module.logged[-1])
    # Pairs are the batch's queries (not its documents), over the step's time, smoothed 50/50 with the last rate.
    expected = [12 / 0.5, 0.5 * (12 / 0.5) + 0.5 * (12 / 0.25), None]
    expected[2] = 0.5 * expected[1] + 0.5 * (24 / 0.1)
    for (name, value, kwargs), want, pairs in zip(rates, expected, [12, 12, 24], strict=True):
        assert name == "pairs/s" and value == pytest.approx(want, rel=1e-6) and value > 0
        assert kwargs == {"prog_bar": True, "logger": False, "batch_size": pairs}


def test_tensorboard_logger(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "run"
    metrics = run(
        compose_train(tiny_run_overrides(train, val, out, load_best_model_at_end="false") + ["logger=tensorboard"])
    )
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    losses = accumulator.Scalars("train/loss")
    assert [e.step for e in losses] == [0, 1, 2, 3] and all(math.isfinite(e.value) and e.value > 0 for e in losses)
    mrr = accumulator.Scalars("val/mrr@10")
    assert [e.step for e in mrr] == [0, 4]  # the base model, then the end of training
    assert [e.value for e in mrr] == pytest.approx([metrics["base"]["mrr@10"], metrics["final"]["mrr@10"]])


def test_mlflow_logger_config(tmp_path: Path) -> None:
    cfg = compose_train(tiny_run_overrides(tmp_path / "t.json", None, tmp_path / "run") + ["logger=mlflow"])
    assert cfg.logger._target_ == "lightning.pytorch.loggers.MLFlowLogger"
    assert cfg.logger.tracking_uri == f"file:{tmp_path / 'run'}/mlruns"
    if importlib.util.find_spec("mlflow") is None:
        pytest.skip("mlflow is not installed (pip install mlflow)")


def test_mlflow_logger_records_the_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run with logger=mlflow leaves its loss and validation metrics under OUTPUT_DIR/mlruns (mlflow-skinny is
    enough: Lightning's MLFlowLogger only imports ``mlflow``)."""
    if importlib.util.find_spec("mlflow") is None:
        pytest.skip("mlflow is not installed (pip install mlflow-skinny)")
    from mlflow.tracking import MlflowClient

    # MLflow 3's file store refuses to open unless this is set; conf/logger/mlflow.yaml writes to a file: URI.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    losses = []
    training_step = EmbeddingFinetuneModule.training_step
    monkeypatch.setattr(
        EmbeddingFinetuneModule,
        "training_step",
        lambda self, *a: losses.append(float(loss := training_step(self, *a))) or loss,
    )
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "run"
    overrides = tiny_run_overrides(train, val, out, load_best_model_at_end="false", **{"eval.evaluation_steps": 2})
    metrics = run(compose_train(overrides + ["logger=mlflow"]))

    assert (out / "mlruns").is_dir()
    client = MlflowClient(f"file:{out / 'mlruns'}")
    experiment = client.get_experiment_by_name("lit_embed")
    assert experiment is not None
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.status == "FINISHED"
    run_id = mlflow_run.info.run_id
    # train/loss: the loss of each of the 4 steps, as the training step computed it.
    history = sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [0, 1, 2, 3]
    assert [m.value for m in history] == pytest.approx(losses, rel=1e-6) and len(losses) == 4
    # val/mrr@10 (MLflow allows no '@' in names: Lightning logs it as val/mrr10): base, step 2 and the end.
    assert "val/mrr10" in mlflow_run.data.metrics and "val/ndcg10" in mlflow_run.data.metrics
    mrr = sorted(client.get_metric_history(run_id, "val/mrr10"), key=lambda m: m.step)
    assert [m.step for m in mrr] == [0, 2, 4]
    assert all(0 <= m.value <= 1 for m in mrr)
    assert mrr[0].value == pytest.approx(metrics["base"]["mrr@10"])
    assert mrr[-1].value == pytest.approx(metrics["final"]["mrr@10"])
    # The same numbers are plain files under OUTPUT_DIR/mlruns/<experiment>/<run>/metrics.
    lines = (out / "mlruns" / experiment.experiment_id / run_id / "metrics" / "val" / "mrr10").read_text().split()
    assert [float(v) for v in lines[1::3]] == pytest.approx([m.value for m in mrr])


def test_python_api(tmp_path: Path) -> None:
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "api"
    metrics = lit_embed.finetune(
        str(train), str(val), model="tiny", batch_size=8, output_dir=str(out), overrides=["trainer.max_steps=2"]
    )
    assert set(metrics) == {"base", "finetuned", "final", "merge"}  # merging is on by default
    assert (out / "model" / "modules.json").is_file() and (out / "metrics.json").is_file()

    # What it returns is what it wrote, with real numbers; the model it saved loads and embeds.
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["final"]["step"] in (0, 2)  # the best of the evaluated steps (2 = max_steps)
    for name in ("base", "final"):
        assert all(0 <= metrics[name][k] <= 1 for k in ("mrr@10", "ndcg@10", "map@100", "recall@10"))
    from sentence_transformers import SentenceTransformer

    embeddings = SentenceTransformer(str(out / "model"), device="cpu").encode(["how do I parse json?"])
    assert embeddings.shape == (1, 64) and np.isfinite(embeddings).all()
    assert float(np.linalg.norm(embeddings)) == pytest.approx(1.0, rel=1e-4)  # the tiny model normalizes
