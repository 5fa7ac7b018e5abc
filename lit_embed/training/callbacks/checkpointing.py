"""Checkpoints every N steps with a retention limit, the best one always kept, exact resume (files: checkpoint_io)."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_embed.errors import check, is_int
from lit_embed.evaluation import DEFAULT_METRIC
from lit_embed.files import link_atomic
from lit_embed.internals import clear_saved_batches, fit_position, reopen_saved_epoch, saved_fit_loop, saved_position
from lit_embed.models.encoder import weights_are_finite
from lit_embed.training.checkpoint_io import keep_weights_only

log = logging.getLogger(__name__)


def _rng_states() -> dict[str, Any]:
    # Plain lists and tensors only, so the checkpoint still loads with weights_only=True.
    numpy_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(_as_tuple(states["python"]))
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def continue_after_stop(fit_loop: dict[str, Any]) -> bool:
    """Rewrites the fit loop state of a checkpoint taken once training stopped (the run's end, a signal between
    epochs) as the state it continues from, so that a longer run (more epochs or steps) goes on from there.

    Lightning closes the epoch training stopped in: it counts it as done even when max_steps stopped it mid-epoch,
    and, resuming a step-limited run, takes an epoch whose batches all ran for the next one with none left. The
    data module saves the same position (``PairDataModule.state_dict``). Returns whether anything changed
    (a rewritten state is left as it is).
    """
    at = saved_position(fit_loop)
    if at.epochs_started == 0 or at.epochs_started > at.epochs_processed or at.batches == 0:
        return False  # before the first epoch, within one, or between two: Lightning resumes these as they are
    if at.last_batch:  # the epoch ran out: the next one starts at its first batch
        clear_saved_batches(fit_loop)
    else:  # stopped mid-epoch: that epoch goes on
        reopen_saved_epoch(fit_loop)
    return True


class StepCheckpoint(L.pytorch.callbacks.Checkpoint):
    """Saves ``step=N.ckpt`` every ``save_steps`` optimizer steps and whenever the monitored metric improves.

    ``last.ckpt`` always points at the newest checkpoint. The newest ``save_total_limit`` step checkpoints are
    kept whole (0 = all), and the best one by ``monitor`` is never deleted: when it is older than those, only its
    encoder's weights are kept (what ``load_best_model_at_end`` and ``lit-embed-export`` need; the optimizer state,
    twice the weights, is only for resuming). The checkpoint also carries the RNG states, restored right before
    the next training batch, so a resumed run continues exactly where the interrupted one stopped.

    Args:
        dirpath: where checkpoints go (default ``<trainer.default_root_dir>/checkpoints``).
        save_steps: save every this many optimizer steps (0 = only on improvement and at the end).
        save_total_limit: how many step checkpoints to keep whole, ``last.ckpt``'s included and the best excluded
            (1 = only what resuming needs; 0 = keep all).
        monitor: metric in ``trainer.callback_metrics`` that picks the best checkpoint (None = no best).
        mode: ``"max"`` or ``"min"``: which direction is better for ``monitor``.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        save_steps: int = 500,
        save_total_limit: int = 1,
        monitor: str | None = f"val/{DEFAULT_METRIC}",
        mode: str = "max",
    ) -> None:
        check(mode in ("max", "min"), "mode", mode, "max (higher monitor is better) or min")
        check(monitor is None or isinstance(monitor, str), "monitor", monitor, "a logged metric's name, or null")
        check(
            is_int(save_steps) and save_steps >= 0,
            "save_steps",
            save_steps,
            "a whole number of optimizer steps >= 0 (0 = only on improvement and at the end)",
        )
        check(
            is_int(save_total_limit) and save_total_limit >= 0,
            "save_total_limit",
            save_total_limit,
            "a whole number of step checkpoints to keep >= 0 (1 = only last.ckpt and the best; 0 = keep all)",
        )
        self.dirpath = Path(dirpath) if dirpath else None
        self.save_steps = save_steps
        self.save_total_limit = save_total_limit
        self.monitor = monitor
        self.mode = mode
        self.saved: list[dict[str, Any]] = []  # {"step", "path"[, "weights_only"]}, oldest first
        self.best: dict[str, Any] | None = None  # {"step", "path", "score"}
        self._rng_to_restore: dict[str, Any] | None = None
        self._deferred: tuple[int, bool] | None = None

    @property
    def last_path(self) -> Path:
        assert self.dirpath is not None
        return self.dirpath / "last.ckpt"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "checkpoints"
        if trainer.is_global_zero and self.dirpath.is_dir():
            for leftover in self.dirpath.glob(".*.tmp"):  # from a write that was killed half-way
                leftover.unlink()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The base model's evaluation is a candidate too: if finetuning only makes things worse, the best
        # checkpoint is the untrained one. Looking at every measured value also keeps a stale one from
        # counting as an improvement later.
        if trainer.global_step == 0 and self._improved(trainer, pl_module):
            self._save(trainer, 0, improved=True)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self._rng_to_restore is not None:
            _set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
        if self._deferred is not None:
            self._save(trainer, *self._deferred)
            self._deferred = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self._saved_at(step):  # gradient accumulation: same optimizer step
            return
        improved = self._improved(trainer, pl_module)
        if improved or (self.save_steps > 0 and step % self.save_steps == 0):
            if fit_position(trainer).last_batch:
                # Lightning miscounts epochs when resuming from a checkpoint taken at an epoch's last batch, so
                # that one is taken at the next batch's start instead: a plain mid-epoch checkpoint, same weights.
                self._deferred = (step, improved)
            else:
                self._save(trainer, step, improved)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._deferred = None  # the final checkpoint below covers it
        step = trainer.global_step
        improved = self._improved(trainer, pl_module)
        if self._saved_at(step) and improved:
            # Saved at this step before the final evaluation, which made it the best: saved again, as the best.
            self.saved.pop()
        if not self._saved_at(step):
            self._save(trainer, step, improved)
        if self.monitor is not None and self.monitor not in trainer.callback_metrics and trainer.is_global_zero:
            # Another callback may log the monitored value, so an unknown name is allowed: say it never came.
            logged = ", ".join(sorted(trainer.callback_metrics))
            log.warning(
                "checkpoint.monitor=%s was never logged (logged: %s), so no best checkpoint was chosen; the last "
                "step is kept. Monitor one of the logged values, e.g. checkpoint.monitor=val/ndcg@10.",
                self.monitor,
                logged,
            )

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # SIGTERM is what schedulers send before killing a job (and Ctrl-C takes its way): keep the work done so far.
        if isinstance(exception, SIGTERMException) and not self._saved_at(trainer.global_step):
            self._save(trainer, trainer.global_step, improved=False)
            log.warning("Stopped by a signal: saved %s; continue with resume=true.", self.last_path)

    def _saved_at(self, step: int) -> bool:
        return bool(self.saved) and self.saved[-1]["step"] == step

    def _improved(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        if self.monitor is None or self.monitor not in trainer.callback_metrics:
            return False
        score = float(trainer.callback_metrics[self.monitor])
        if not np.isfinite(score):
            return False
        better = self.best is None or (score > self.best["score"] if self.mode == "max" else score < self.best["score"])
        # A model with NaN/inf weights is never the best, whatever its score says.
        return better and weights_are_finite(pl_module)

    def _save(self, trainer: L.Trainer, step: int, improved: bool) -> None:
        assert self.dirpath is not None
        path = self.dirpath / f"step={step}.ckpt"
        self.saved.append({"step": step, "path": str(path)})
        if improved:
            self.best = {"step": step, "path": str(path), "score": float(trainer.callback_metrics[self.monitor])}
        # Atomic through AtomicCheckpointIO; includes this callback's state.
        trainer.save_checkpoint(path, weights_only=False)
        if trainer.is_global_zero:
            link_atomic(path, self.last_path)
            self._prune()
        trainer.strategy.barrier()

    def _prune(self) -> None:
        if self.save_total_limit <= 0:
            return
        keep = {entry["path"] for entry in self.saved[-self.save_total_limit :]}
        for entry in [e for e in self.saved if e["path"] not in keep]:
            if self.best and entry["path"] == self.best["path"]:
                if not entry.get("weights_only") and Path(entry["path"]).is_file():
                    keep_weights_only(entry["path"])
                entry["weights_only"] = True
            else:
                Path(entry["path"]).unlink(missing_ok=True)
                self.saved.remove(entry)

    def kept_summary(self) -> str:
        """One line on what is left in the checkpoint folder, for the end of a run."""
        if not self.saved or self.dirpath is None:
            return "checkpoints: none saved"
        newest = self.saved[-1]
        kept = [f"last.ckpt (resume, step {newest['step']})"]
        others = [e for e in self.saved[:-1] if not (self.best and e["path"] == self.best["path"])]
        if others:
            kept.append(f"{len(others)} more whole: " + ", ".join(Path(e["path"]).name for e in others))
        if self.best is not None:
            score = f"{self.monitor} {self.best['score']:.4f}"
            best_entry = next((e for e in self.saved if e["path"] == self.best["path"]), {})
            if self.best["path"] == newest["path"]:
                kept[0] = f"last.ckpt (resume, step {newest['step']}, also the best: {score})"
            else:
                what = "weights only" if best_entry.get("weights_only") else "whole"
                kept.append(f"best {Path(self.best['path']).name} ({score}, {what})")
        # Hard links (last.ckpt and its step file) count once.
        sizes = {(s.st_dev, s.st_ino): s.st_size for s in (p.stat() for p in self.dirpath.glob("*.ckpt"))}
        total = sum(sizes.values())
        size = f"{total / 1e6:.0f} MB" if total >= 1e6 else f"{total / 1e3:.0f} kB"  # LoRA checkpoints are small
        return f"checkpoints: kept {' and '.join(kept)}, {size} in {self.dirpath}"

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        fit_loop = saved_fit_loop(checkpoint)
        if fit_loop is not None:
            continue_after_stop(fit_loop)

    def state_dict(self) -> dict[str, Any]:
        return {"saved": self.saved, "best": self.best, "rng": _rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved = list(state_dict["saved"])
        self.best = state_dict["best"]
        self._rng_to_restore = state_dict["rng"]
