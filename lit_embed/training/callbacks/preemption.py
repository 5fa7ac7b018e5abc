"""A signal that stops training stops every rank after the same step: a scheduler's SIGTERM (preemption), SLURM's
requeue signal before the time limit (``#SBATCH --signal=USR1@90``) and Ctrl-C.

The signal reaches the ranks at different moments, or only some of them (``kill`` of one process, a node that is
preempted first). A rank that stopped on its own would leave the others waiting in the next step's collectives,
so each step ends with one all-reduce of "has any rank been signalled?", and all ranks stop at the step where the
answer turns yes: they save the checkpoint together and exit, and the requeued job resumes (``resume=auto``).
Lightning's own handlers are replaced while training: they broadcast from inside the signal handler, which hangs
when the signal reaches one rank in the middle of another collective.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment

from lit_embed.internals import stop_after_this_step

log = logging.getLogger(__name__)


def requeue_signal(trainer: L.Trainer) -> int | None:
    """The signal SLURM sends before the time limit, when the job runs under SLURM with Lightning's auto-requeue."""
    environment = getattr(trainer.strategy, "cluster_environment", None)  # none in a single-device run
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
        return int(environment.requeue_signal or signal.SIGUSR1)
    return None


class StopTogether(L.Callback):
    """Stops all ranks after the first step at whose end any of them has received SIGTERM, SIGINT (handed on by
    :func:`~lit_embed.training.lifecycle.ctrl_c_saves`) or SLURM's requeue signal; the checkpoint callback then
    saves. Lightning's ``SIGTERMException`` carries the signal's number as ``signum`` (the exit status) and whether
    it was SLURM's requeue signal as ``requeue``."""

    def __init__(self) -> None:
        self.received = 0  # the signal's number, 0 for none
        self._requeue: int | None = None  # SLURM's requeue signal, under SLURM with auto-requeue
        self._previous: dict[int, Any] = {}
        self._trainer: L.Trainer | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only (a notebook's training thread keeps Lightning's handling)
        self.received, self._trainer, self._requeue = 0, trainer, requeue_signal(trainer)
        for signum in (signal.SIGTERM, self._requeue):
            if signum is not None:
                self._previous[signum] = signal.signal(signum, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        # Only a note here: collectives, saving and logging wait for the step's end.
        if not self.received and self._trainer is not None:
            launcher = self._trainer.strategy.launcher
            if launcher is not None:  # Lightning's DDP launcher: the ranks it started get the signal too
                launcher.kill(signum)
        self.received = self.received or signum

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.world_size > 1:  # one number a step, about as much as Lightning's own per-step broadcast
            signum = torch.tensor([self.received], dtype=torch.long, device=trainer.strategy.root_device)
            torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX)
            self.received = int(signum.item())
        if self.received:
            log.warning(
                "Rank %d: %s: saving a checkpoint after step %d on every rank, then stopping.",
                trainer.global_rank,
                signal.Signals(self.received).name,
                trainer.global_step,
            )
            stop_after_this_step(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.received:
            exception.signum = self.received  # type: ignore[attr-defined]
            exception.requeue = self.received == self._requeue  # type: ignore[attr-defined]
        self._restore()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous, self._trainer = {}, None


def requeue_slurm_job() -> None:
    """Puts this SLURM job back in the queue (``scontrol requeue``), as Lightning's auto-requeue does; the requeued
    job runs the same command, which resumes with ``resume=auto``."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
    except OSError as err:
        log.warning("Could not requeue SLURM job %s (scontrol: %s): requeue it yourself.", job, err.strerror)
        return
    if result.returncode == 0:
        log.info("Requeued SLURM job %s.", job)
    else:
        log.warning("scontrol requeue %s failed (%s): requeue it yourself.", job, result.stderr.strip())
