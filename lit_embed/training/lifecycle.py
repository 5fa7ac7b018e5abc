"""One run's life in its output_dir: the folder it may write into, the lock that keeps a second run out, the config
record, the check that a resumed run trains what its checkpoint trained, and Ctrl-C taking SIGTERM's way (save, then
stop)."""

from __future__ import annotations

import copy
import logging
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lit_embed.data.datamodule import trainer_data
from lit_embed.distributed import is_launching_process
from lit_embed.errors import LitEmbedError, StoppedError
from lit_embed.files import FolderLock, check_folder_owner, mark_folder, write_text_atomic
from lit_embed.internals import saved_fit_loop, saved_position
from lit_embed.training.callbacks.checkpointing import continue_after_stop
from lit_embed.training.callbacks.preemption import requeue_slurm_job
from lit_embed.training.module import EmbeddingFinetuneModule

log = logging.getLogger(__name__)

# Written into output_dir when a run takes it: the folder is a lit_embed run's, and later runs may write into it.
RUN_MARKER = ".lit_embed_run"
RUN_NOTE = "This folder is a lit_embed run's: later runs may write into it (output_dir, resume, overwrite)."
HYDRA_LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job_logging, for train.log
CONFIG_KEY = "lit_embed_config"  # the run's resolved config, in every checkpoint
DATA_KEY = "lit_embed_data"  # what its training rows were made from (PairDataModule.data_identity)

# Top-level keys whose values decide what is trained. The others (output_dir, resume, resume_changed, overwrite,
# logger, callbacks, eval, checkpoint, merge, optimized_metric, load_best_model_at_end) may differ on a resume.
TRAINED_KEYS = ("model", "method", "adapter", "lora", "data", "loss", "optimizer", "scheduler", "seed", "trainer")
# ...except these, which change how long, how fast or how visibly the same training runs: extending a run
# (trainer.max_steps) or giving it more data workers is what a resume is for.
UNTRAINED_KEYS = {
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.min_steps",
    "trainer.min_epochs",
    "trainer.max_time",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.enable_checkpointing",
    "trainer.num_sanity_val_steps",
    "trainer.val_check_interval",
    "trainer.check_val_every_n_epoch",
    "trainer.limit_val_batches",
    "trainer.profiler",
    "method.compile",
    "method.encoder.cache_dir",
    "method.encoder.batch_size",
    "loss.cache_dir",
    "loss.loss.cache_dir",
    "loss.guide_batch_size",
    "loss.loss.guide_batch_size",
}
UNTRAINED_DATA_LEAVES = {"val_path", "num_workers", "pin_memory", "persistent_workers", "cache_dir"}


def check_output_path(output_dir: str | os.PathLike) -> None:
    """Refuses what is never a run's folder, whatever it holds: an existing file, the file-system root, the home
    folder and the current working directory (a run fills its folder with logs/, checkpoints/, metrics.json ...)."""
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise LitEmbedError(
            f"output_dir={output_dir} is a file, not a folder. Choose a folder for everything the run writes, e.g. "
            f"output_dir={path.parent / 'runs' / path.stem}."
        )
    resolved = path.resolve()
    for name, place in (
        ("the file-system root", Path("/")),
        ("your home folder", Path.home()),
        ("the current working directory", Path.cwd()),
    ):
        if resolved == place.resolve():
            raise LitEmbedError(
                f"output_dir={output_dir} is {name}: a run writes logs/, checkpoints/, model/ and metrics.json into "
                f"its output_dir, so it never writes there. Choose a folder of its own, e.g. "
                f"output_dir={path / 'runs' / 'mine'}."
            )


def check_run_folder(output_dir: str | os.PathLike) -> None:
    """Refuses an output_dir a run may not write into (:func:`check_output_path`), or one that holds what no run made:
    a run writes only into a folder that is new, empty, or marked as a run's (:data:`RUN_MARKER`), so no file of the
    user's is ever replaced or mixed with a run's."""
    check_output_path(output_dir)
    check_folder_owner(output_dir, RUN_MARKER, f"output_dir={output_dir}", "a lit_embed run")


def mark_run_folder(output_dir: str | os.PathLike) -> None:
    """Marks ``output_dir`` as a lit_embed run's folder (see :func:`check_run_folder`)."""
    mark_folder(output_dir, RUN_MARKER, RUN_NOTE)


class OutputDirLock(FolderLock):
    """The lock of a run's output_dir (:class:`lit_embed.files.FolderLock`), held while the run lives; taking it
    marks the folder as a run's."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        super().__init__(output_dir, (RUN_MARKER, RUN_NOTE), f"output_dir={output_dir}", "another run")


def hydra_record(cfg: DictConfig) -> dict[str, str]:
    """The ``.hydra/`` files of the running Hydra job, as Hydra names and writes them.

    ``conf/train.yaml`` sets ``hydra.output_subdir: null`` so that Hydra does not write them itself before the job
    starts: a run that is refused (its folder holds a finished model, another run holds it, its checkpoint was
    trained otherwise) then leaves that folder's record as it was. The app writes them once the run owns the folder.
    """
    hydra = HydraConfig.instance().cfg  # {"hydra": ...}, what Hydra writes to hydra.yaml
    return {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml(hydra),
        "overrides.yaml": OmegaConf.to_yaml(hydra.hydra.overrides.task),
    }


def composed_record(cfg: DictConfig, overrides: Sequence[str]) -> dict[str, str]:
    """The ``.hydra/`` files of a run composed without Hydra's job machinery (``lit_embed.finetune``): the composed
    config and the overrides, with the names and in the form Hydra writes them, so that whatever reads a Hydra run's
    record reads this one too. There is no ``hydra.yaml``: no Hydra job ran, so there are no job settings to record."""
    return {"config.yaml": OmegaConf.to_yaml(cfg), "overrides.yaml": OmegaConf.to_yaml(list(overrides))}


class _RunLogHandler(logging.FileHandler):
    """Opens its file at the first record, creating the folder then (as a Hydra job's folder exists from its start)."""

    def _open(self) -> Any:
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


@contextmanager
def run_log(output_dir: str | os.PathLike) -> Iterator[None]:
    """While a run without Hydra's job machinery lives, everything logged goes to ``output_dir/train.log`` too, as a
    Hydra job's file handler writes it (same name, format and level), so both kinds of run leave the same log.

    The console keeps what it showed before: where the root logger had no handler, Python printed warnings and
    errors through its last-resort handler, which a handler on the root would silence, so one like it stands in.
    """
    root = logging.getLogger()
    handler = _RunLogHandler(Path(output_dir) / "train.log", delay=True, encoding="utf-8")
    handler.setFormatter(logging.Formatter(HYDRA_LOG_FORMAT))
    console = None
    if not root.handlers:
        console = logging.StreamHandler()
        console.setLevel(logging.WARNING)
        root.addHandler(console)
    level = root.level
    root.setLevel(logging.INFO if level > logging.INFO else level)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)  # already gone if the run was refused (keep_log_files_out_of)
        handler.close()
        if console is not None:
            root.removeHandler(console)
        root.setLevel(level)


def write_hydra_record(output_dir: str | os.PathLike, files: dict[str, str]) -> None:
    """Writes the files of :func:`hydra_record` into ``output_dir/.hydra``, each atomically."""
    for name, text in files.items():
        write_text_atomic(Path(output_dir) / ".hydra" / name, text)


def keep_log_files_out_of(output_dir: str | os.PathLike) -> None:
    """Detaches the log files inside ``output_dir`` (Hydra's ``train.log``): a refused run's message then goes to
    the console only, and the log of the run that owns the folder stays as it was."""
    root, folder = logging.getLogger(), Path(output_dir).resolve()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).resolve().is_relative_to(folder):
            root.removeHandler(handler)
            handler.close()


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The config with every interpolation resolved, as plain containers (a checkpoint loads it with weights_only)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise LitEmbedError(
            f"{str(err).splitlines()[0]}. Fix the value in the config or on the command line."
        ) from None


class RecordConfig(L.Callback):
    """Stores the run's resolved config (where it has one) and what its data was in every checkpoint, so that a
    resume can see what changed."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.config is not None:
            checkpoint[CONFIG_KEY] = self.config
        data = trainer_data(trainer)
        checkpoint[DATA_KEY] = data.data_identity() if data is not None else {}


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _trains(key: str) -> bool:
    if key.split(".")[0] not in TRAINED_KEYS or any(key == k or key.startswith(k + ".") for k in UNTRAINED_KEYS):
        return False
    return not (key.startswith("data.") and key.rsplit(".", 1)[-1] in UNTRAINED_DATA_LEAVES)


def _relative(value: Any, output_dir: str) -> Any:
    # Paths inside the run's own folder (model=tiny's base_model) move with it: compare them relative to it.
    if isinstance(value, str) and output_dir and value.startswith(output_dir):
        return "${output_dir}" + value[len(output_dir) :]
    if isinstance(value, list):
        return [_relative(v, output_dir) for v in value]
    return value


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that changes what is trained (see TRAINED_KEYS)."""
    old_flat = {k: _relative(v, str(old.get("output_dir", ""))) for k, v in _flat(old).items() if _trains(k)}
    new_flat = {k: _relative(v, str(new.get("output_dir", ""))) for k, v in _flat(new).items() if _trains(k)}
    absent = "(not set)"
    # A setting added after the old run was written is off (null or false) unless asked for: as it behaved then.
    off = {key: value for key, value in new_flat.items() if key not in old_flat and (value is None or value is False)}
    return [
        f"{key}: {old_flat.get(key, absent)} -> {new_flat.get(key, absent)}"
        for key in sorted(old_flat.keys() | new_flat.keys() - off.keys())
        if old_flat.get(key, absent) != new_flat.get(key, absent)
    ]


def check_resumable(path: str, checkpoint: dict[str, Any]) -> None:
    """A best checkpoint kept with its weights only cannot continue training: say so, and what can."""
    if checkpoint.get("weights_only_best"):
        raise LitEmbedError(
            f"cannot resume from {path}: it holds only the model's weights (a best step kept without the optimizer "
            "state to save disk). Resume from last.ckpt in the same folder, or export this one with "
            f"`lit-embed-export {path} OUT_DIR`. checkpoint.save_total_limit=0 keeps every checkpoint whole."
        )


def check_resume_config(path: str, checkpoint: dict[str, Any], config: dict[str, Any], allow_changed: bool) -> None:
    """Refuses to resume a checkpoint whose run trained something else (another model, batch size, loss ...).

    Continuing such a run silently mixes two setups: the data position counts the old batches, the optimizer
    state belongs to the old weights. ``resume_changed=true`` continues anyway.
    """
    check_resumable(path, checkpoint)
    old = checkpoint.get(CONFIG_KEY)
    if old is None:
        log.warning("%s has no record of its run's settings (written before they were stored): not compared.", path)
        return
    changes = changed_settings(old, config)
    if changes and not allow_changed:
        raise LitEmbedError(
            f"cannot resume from {path}: these settings differ from the run that wrote it:\n  "
            + "\n  ".join(changes)
            + "\nResume with the checkpoint's settings, start a new run (another output_dir, no resume), or set "
            "resume_changed=true to continue from its weights, optimizer state and data position anyway."
        )
    if changes:
        log.warning("resume_changed=true: resuming %s with changed settings: %s", path, "; ".join(changes))


def check_resume_data(
    path: str, checkpoint: dict[str, Any], data: dict[str, dict[str, Any]], allow_changed: bool
) -> None:
    """Refuses to resume a checkpoint on training data other than its run's: a replaced or edited file under the
    same name would otherwise be trained on from the old data position, and the export would mix the two.

    ``data``: ``PairDataModule.data_identity()`` of this run's data module; ``resume_changed=true`` continues anyway.
    """
    old = checkpoint.get(DATA_KEY)
    if old is None:
        log.warning("%s has no record of the data it trained on (written before it was stored): not compared.", path)
        return

    def described(entry: dict[str, Any] | None) -> str:
        if not entry:
            return "(not trained on)"
        return f"{entry.get('source')}, {entry.get('pairs')} pairs (rows {str(entry.get('rows'))[:12]})"

    def same(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
        return bool(a) and bool(b) and (a["rows"], a["pairs"]) == (b["rows"], b["pairs"])

    changes = [
        f"{where}: {described(old.get(where))} -> {described(data.get(where))}"
        for where in sorted(old.keys() | data.keys())
        if not same(old.get(where), data.get(where))
    ]
    if changes and not allow_changed:
        raise LitEmbedError(
            f"cannot resume from {path}: its run trained on other data (the file's content, or how it was read, "
            "changed since):\n  "
            + "\n  ".join(changes)
            + "\nResume with the data it trained on, start a new run (another output_dir, no resume), or set "
            "resume_changed=true to continue from its weights, optimizer state and data position on this data."
        )
    if changes:
        log.warning("resume_changed=true: resuming %s on other data: %s", path, "; ".join(changes))


def check_resume_length(path: str, checkpoint: dict[str, Any], max_steps: int | None, max_epochs: int | None) -> None:
    """Says in one line when a resumed run's length leaves nothing to train; refuses one that ends before it.

    ``max_steps`` / ``max_epochs`` as the trainer takes them (-1 or None: no limit). A run resumed with the length
    it already trained finishes without training (and exports what it trained); a longer one trains the rest.
    """
    fit_loop = saved_fit_loop(checkpoint)
    if fit_loop is None:  # not a training checkpoint: Lightning says what is wrong with it
        return
    fit_loop = copy.deepcopy(fit_loop)
    # True for a checkpoint that Lightning's counts were saved into as training stopped, not rewritten as
    # StepCheckpoint now does (an earlier lit_embed's last.ckpt): read as rewritten, but its data position cannot
    # tell where a longer run goes on.
    not_rewritten = continue_after_stop(fit_loop)
    steps = checkpoint.get("global_step", 0)
    at = saved_position(fit_loop)
    epochs, batches = at.epochs_completed, at.batches  # batches of the epoch in progress
    # For each limit: how the checkpoint stands to it (-1 before it, 0 at it, 1 past it).
    standing = {}
    if max_steps is not None and max_steps >= 0:
        standing[f"trainer.max_steps={max_steps}"] = (steps > max_steps) - (steps < max_steps)
    if max_epochs is not None and max_epochs >= 0:
        standing[f"trainer.max_epochs={max_epochs}"] = ((epochs, batches) > (max_epochs, 0)) - (epochs < max_epochs)
    done = f"{epochs} epoch{'s' * (epochs != 1)}" + (f" and {batches} batches" if batches else "")
    if not standing or max(standing.values()) < 0:
        if not_rewritten:
            raise LitEmbedError(
                f"cannot continue {path} with a longer run: it was written when its run ended, without the data "
                "position a longer run goes on from (an earlier lit_embed's last checkpoint). Resume from a "
                "step=N.ckpt written during that run, or start a new run."
            )
        return
    limit = max(standing, key=standing.__getitem__)
    if standing[limit] > 0:
        raise LitEmbedError(
            f"cannot resume from {path}: it has trained {steps} steps ({done}), past {limit}, and a run cannot be "
            "shortened. Resume with at least the checkpoint's length, or export an earlier checkpoint with "
            "lit-embed-export."
        )
    log.warning(
        "%s has trained %d steps (%s), all that %s allows: nothing is left to train. Raise trainer.max_epochs or "
        "trainer.max_steps to train further.",
        path,
        steps,
        done,
        limit,
    )


def check_weights_fit(path: str, checkpoint: dict[str, Any], module: L.LightningModule) -> None:
    """One message, instead of a page of size mismatches, when a checkpoint's weights are not this model's."""
    saved = checkpoint.get("state_dict")
    if not isinstance(saved, dict):
        return
    state = module.state_dict()
    if isinstance(module, EmbeddingFinetuneModule):  # under LoRA a checkpoint leaves the frozen base out
        state = module.checkpoint_weights(state)
    expected = {name: tuple(t.shape) for name, t in state.items()}
    found = {name: tuple(getattr(t, "shape", ())) for name, t in saved.items()}
    problems = [f"{n} missing" for n in expected if n not in found]
    problems += [f"{n} not in this model" for n in found if n not in expected]
    problems += [f"{n} {found[n]} vs {expected[n]}" for n in expected if n in found and found[n] != expected[n]]
    if problems:
        raise LitEmbedError(
            f"cannot resume from {path}: its weights do not fit this model ({len(problems)} of {len(expected)} "
            f"differ, e.g. {'; '.join(problems[:3])}). It was trained with another model: resume with that model's "
            "settings, or start a new run without resuming."
        )


@contextmanager
def ctrl_c_saves() -> Iterator[list[int]]:
    """While Lightning trains, Ctrl-C (SIGINT) takes SIGTERM's way: stop after the step, save, exit.

    Lightning's own Ctrl-C handling saves nothing and exits 1. Here the first SIGINT is handed to the SIGTERM
    handler Lightning installs during fit (so the loop stops at the next batch and the checkpoint callback saves);
    a second one in the launching process stops at once. Outside fit Ctrl-C is a plain KeyboardInterrupt. The
    yielded list receives the signal, so the caller can tell SIGINT (exit 130) from SIGTERM (143).
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous, sigterm_before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:
        on_sigterm = signal.getsignal(signal.SIGTERM)
        if received:  # DDP ranks > 0 get it twice: from the terminal and forwarded by rank 0
            if is_launching_process():
                raise KeyboardInterrupt
            return
        if on_sigterm is sigterm_before or not callable(on_sigterm):  # not training (yet)
            raise KeyboardInterrupt
        received.append(signum)
        log.warning("Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again stops at once).")
        on_sigterm(signum, frame)

    signal.signal(signal.SIGINT, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def stopped_by_signal(continue_with: str) -> Iterator[None]:
    """Around ``trainer.fit``: Ctrl-C saves as SIGTERM does (:func:`ctrl_c_saves`), and a signal that stopped the
    run (:class:`~lit_embed.training.callbacks.preemption.StopTogether`) ends it with a :class:`StoppedError` that says
    how to continue (``continue_with``, e.g. ``resume=true``) and exits 128 + its number: 130 (Ctrl-C), 143
    (SIGTERM), 138 (SIGUSR1, SLURM's signal before the time limit, after which the job is requeued)."""
    with ctrl_c_saves() as signals:
        try:
            yield
        except SIGTERMException as stop:
            # The signal that stopped the job, on every rank (StopTogether), whichever rank received it.
            signum = signals[0] if signals else getattr(stop, "signum", signal.SIGTERM)
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            message = f"stopped by {name}; the checkpoint is saved. Continue with {continue_with}."
            if getattr(stop, "requeue", False):  # SLURM's signal before the time limit (StopTogether knows it)
                if is_launching_process():
                    requeue_slurm_job()
                message = f"stopped by {name} before SLURM's time limit; the checkpoint is saved and the job requeued."
            raise StoppedError(message, signum) from None


class RunFolder:
    """A run's hold on its output_dir, from its first check to its last file: ``with RunFolder(output_dir) as folder``.

    Entering refuses a folder the run may not write into (:func:`check_run_folder`) before anything is written there,
    and locks one that exists (always, under Hydra) at once. Only the launching process locks: the other ranks of a
    distributed run share the folder, and find it marked. A new folder is locked by :meth:`training`, once the data
    and model are known to be good, since nothing may be written before that.

    The ``.hydra/`` record (``hydra_record``, see :func:`hydra_record`) goes into a new folder at once, where it is
    kept even if a check fails (a sweep's summary finds the job); into a folder that holds a run already only at
    :meth:`checks_passed`, so that a refused run leaves that folder as it was. A run refused before that writes
    nothing into a folder that is not its own, its ``train.log`` included. Leaving releases the lock.
    """

    def __init__(self, output_dir: str | os.PathLike, hydra_record: dict[str, str] | None = None) -> None:
        self.path = Path(output_dir)
        self.record = hydra_record or {}
        self.lock = OutputDirLock(self.path) if is_launching_process() else None
        if self.lock is None:
            # One process writes train.log: another node's rank, started first, would make the file in a folder
            # the launching process has not marked yet (and which it then refuses). Its messages go to its console.
            keep_log_files_out_of(self.path)
        self.ours = False  # whether the run may write into the folder before its checks pass: a new one
        self.checked = False

    def __enter__(self) -> RunFolder:
        new = not (self.path / RUN_MARKER).exists()
        try:
            if self.lock is None:
                check_output_path(self.path)
            else:
                check_run_folder(self.path)
                if self.path.is_dir():
                    self.lock.acquire()
        except BaseException as err:
            self.__exit__(type(err), err, err.__traceback__)
            raise
        self.ours = new
        if self.lock is not None and self.record and new:
            write_hydra_record(self.path, self.record)
        return self

    def checks_passed(self) -> None:
        """Everything a user can get wrong was checked: the record goes in now."""
        self.checked = True
        if self.lock is not None and self.record:
            write_hydra_record(self.path, self.record)

    @contextmanager
    def training(self, continue_with: str = "resume=true") -> Iterator[None]:
        """Around ``trainer.fit``: locks a new folder, and a signal stops the run as :func:`stopped_by_signal` says."""
        if self.lock is not None and not self.lock.held:
            self.lock.acquire()
        with stopped_by_signal(continue_with):
            yield

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, traceback: Any) -> None:
        if isinstance(err, LitEmbedError) and not self.checked and not self.ours:
            keep_log_files_out_of(self.path)  # another run's folder: its train.log must not get this run's message
        if self.lock is not None:
            self.lock.release()
