"""What a run shows while and after it trains: the progress bar with pairs/s, and a PNG of the run at the end."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar as LightningProgressBar

from lit_embed.batch import pair_batches
from lit_embed.errors import check, is_number
from lit_embed.evaluation import METRIC_NAMES
from lit_embed.internals import rich_progress_available
from lit_embed.training.callbacks.ir_eval import IREvaluationCallback


def epoch_description(trainer: L.Trainer, epoch: int) -> str:
    """``Epoch 1/2``, counted from 1 (Lightning shows the first of one epoch as ``Epoch 0/0``)."""
    total = trainer.max_epochs
    return f"Epoch {epoch + 1}/{total}" if total is not None and total > 0 else f"Epoch {epoch + 1}"


class ProgressBar(RichProgressBar if rich_progress_available() else TQDMProgressBar):
    """Lightning's progress bar (rich where installed, else tqdm) without the logger's version number (``v_num``),
    which says nothing about training, and with epochs counted from 1."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def _get_train_description(self, current_epoch: int) -> str:  # RichProgressBar's one place for the text
        # Padded like Lightning's, so the bar does not jump between training and validation descriptions.
        return f"{epoch_description(self.trainer, current_epoch):{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if isinstance(self, TQDMProgressBar):  # tqdm's bar takes its text here
            self.train_progress_bar.set_description(epoch_description(trainer, trainer.current_epoch))


def default_progress_bar(enabled: bool | None, callbacks: Sequence[L.Callback]) -> list[L.Callback]:
    """``[ProgressBar()]`` unless the trainer's bar is switched off or ``callbacks`` bring their own."""
    if enabled is False or any(isinstance(c, LightningProgressBar) for c in callbacks):
        return []
    return [ProgressBar()]


class PairsPerSecond(L.Callback):
    """Shows training pairs per second (smoothed over recent steps) in the progress bar as ``pairs/s``."""

    def __init__(self, smoothing: float = 0.9) -> None:
        check(is_number(smoothing) and 0 <= smoothing < 1, "smoothing", smoothing, "a number in [0, 1)")
        self.smoothing = smoothing
        self._start: float | None = None
        self._rate: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *args):
        if self._start is None:
            return
        pairs = sum(len(pairs) for pairs in pair_batches(batch))
        rate = pairs / max(time.perf_counter() - self._start, 1e-9)
        self._rate = rate if self._rate is None else self.smoothing * self._rate + (1 - self.smoothing) * rate
        pl_module.log("pairs/s", self._rate, prog_bar=True, logger=False, batch_size=pairs)


class TrainingPlot(L.Callback):
    """Writes ``<default_root_dir>/training.png`` at the end: the training loss over steps, and the validation
    metrics at every evaluation with the base model's values as dashed lines.

    Args:
        filename: the PNG's name inside the run's output directory.
        metrics: validation metrics to draw.
    """

    def __init__(self, filename: str = "training.png", metrics: tuple[str, ...] = ("mrr@10", "ndcg@10")) -> None:
        allowed = f"a list of validation metrics among {', '.join(METRIC_NAMES)}"
        check(isinstance(metrics, Sequence) and not isinstance(metrics, str), "metrics", metrics, allowed)
        unknown = [name for name in metrics if name not in METRIC_NAMES]
        check(not unknown, "metrics", list(metrics), allowed)
        self.filename = filename
        self.metrics = metrics
        self.losses: list[tuple[int, Any]] = []  # (step, loss); losses stay tensors until needed: no sync per step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:  # None: a skipped non-finite batch
            self.losses.append((trainer.global_step, loss.detach()))

    def _float_losses(self) -> list[tuple[int, float]]:
        return [(step, float(loss)) for step, loss in self.losses]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            history = next((c.history for c in trainer.callbacks if isinstance(c, IREvaluationCallback)), [])
            plot_run(self._float_losses(), history, self.metrics, Path(trainer.default_root_dir) / self.filename)

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self._float_losses()}  # a resumed run still draws the whole curve

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.losses = [tuple(pair) for pair in state_dict["losses"]]


def plot_run(
    losses: list[tuple[int, float]], history: list[dict[str, Any]], metrics: tuple[str, ...], path: Path
) -> Path:
    """Draws the loss curve and the validation metrics over steps into ``path`` (PNG)."""
    plt = pyplot()
    panels = 2 if history else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    draw_loss(axes[0][0], losses)
    if history:
        draw_validation(axes[0][1], history, metrics)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed), imported only when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_loss(ax: Any, losses: list[tuple[int, float]], smoothing: float | None = None) -> None:
    """The training loss over steps on ``ax``; with ``smoothing``, the raw values faint and their exponential
    moving average (``smoothing`` the weight of the past) over them."""
    if losses:
        steps, values = zip(*losses, strict=True)
        if smoothing is None:
            ax.plot(steps, values, linewidth=1, color="tab:blue")
        else:
            ax.plot(steps, values, linewidth=1, color="tab:blue", alpha=0.3, label="logged")
            ax.plot(steps, ema(values, smoothing), linewidth=2, color="tab:blue", label=f"EMA {smoothing:g}")
            ax.legend(fontsize=8)
    ax.set(title="training loss", xlabel="optimizer step", ylabel="train/loss")
    ax.grid(alpha=0.3)


def ema(values: Sequence[float], smoothing: float) -> list[float]:
    """Exponential moving average, debiased as TensorBoard's smoothing is (the first value is not pulled to 0)."""
    smoothed, average, weight = [], 0.0, 0.0
    for value in values:
        average = smoothing * average + (1 - smoothing) * value
        weight = smoothing * weight + (1 - smoothing)
        smoothed.append(average / weight)
    return smoothed


def draw_validation(ax: Any, history: list[dict[str, Any]], metrics: Sequence[str]) -> None:
    """Each validation metric of ``history`` (``[{"step", "metrics"}]``) over steps on ``ax``, the first (base
    model) value as a dashed line and the last one written beside its point."""
    steps = [h["step"] for h in history]
    for name, color in zip(metrics, ("tab:green", "tab:orange", "tab:purple", "tab:red"), strict=False):
        values = [h["metrics"][name] for h in history]
        ax.plot(steps, values, marker="o", color=color, label=f"val/{name}")
        ax.axhline(values[0], color=color, linestyle="--", linewidth=1, label=f"base {values[0]:.4f}")
        ax.annotate(f"{values[-1]:.4f}", (steps[-1], values[-1]), textcoords="offset points", xytext=(4, 4))
    ax.set(title="validation retrieval", xlabel="optimizer step", ylabel="metric")
    ax.margins(x=0.1, y=0.12)  # room for the final values written beside and above the last points
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")  # retrieval mostly improves: the curves rise away from this corner
