"""The Hydra app: compose the config, build every object from ``_target_``, evaluate, finetune, export.

``python train.py [group=choice ...] [key=value ...]`` or ``lit-embed-train``; ``lit_embed.finetune(...)`` is the same
job from Python.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from lit_embed.config import (
    CONFIG_DIR,
    build,
    check_added_keys,
    check_output_dir,
    check_run_settings,
    compose_config,
    register_resolvers,
)
from lit_embed.console import quiet_third_party_output
from lit_embed.data.datamodule import PairDataModule, check_pair_data
from lit_embed.distributed import is_launching_process
from lit_embed.errors import FinishedRunError, LitEmbedError, reported
from lit_embed.evaluation import METRIC_NAMES
from lit_embed.losses.base import EmbeddingLoss, check_several_positives
from lit_embed.losses.distill import check_distillation_data
from lit_embed.mine import mine_for_training
from lit_embed.models.lora import lora_config, lora_summary
from lit_embed.models.model_folder import check_model_folder
from lit_embed.models.precomputed import PrecomputedEmbeddings
from lit_embed.models.reranker import has_score_head
from lit_embed.sweeps import sweep_job
from lit_embed.training.callbacks.checkpointing import StepCheckpoint
from lit_embed.training.callbacks.ir_eval import IREvaluationCallback
from lit_embed.training.callbacks.preemption import StopTogether
from lit_embed.training.callbacks.progress import default_progress_bar
from lit_embed.training.callbacks.rerank_eval import RerankEvaluationCallback, load_retriever
from lit_embed.training.checkpoint_io import AtomicCheckpointIO, load_checkpoint
from lit_embed.training.finish import finish
from lit_embed.training.lifecycle import (
    CONFIG_KEY,
    RecordConfig,
    RunFolder,
    check_output_path,
    check_resume_config,
    check_resume_data,
    check_resume_length,
    check_weights_fit,
    composed_record,
    hydra_record,
    keep_log_files_out_of,
    resolved_config,
    run_log,
)
from lit_embed.training.merging import WeightMerging
from lit_embed.training.recipe import AUTO, Recipe, default_recipe, explain

log = logging.getLogger(__name__)


def run(cfg: DictConfig, hydra_record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Runs one finetuning job as configured and returns ``metrics.json``'s content.

    ``hydra_record``: a Hydra job's ``.hydra/`` files, written as the run takes its output_dir (:class:`RunFolder`).
    """
    started = time.time()  # the model card's wall time: the whole run, loading and evaluation included
    register_resolvers()
    quiet_third_party_output()
    check_output_dir(cfg.output_dir)
    finished = Path(cfg.output_dir) / "metrics.json"
    if cfg.resume == AUTO and finished.is_file() and not cfg.overwrite:  # a requeue of a job that finished
        log.info(
            "resume=auto: %s holds this run's finished model; nothing to do (to train further, set overwrite=true "
            "and a larger trainer.max_steps or max_epochs).",
            cfg.output_dir,
        )
        return json.loads(finished.read_text(encoding="utf-8"))
    with RunFolder(cfg.output_dir, hydra_record) as folder:
        checked = check_job(cfg, folder.path)
        folder.checks_passed()
        job = build_job(cfg, checked, folder.path)
        with folder.training("the same command" if cfg.resume == AUTO else "resume=true"):
            fit_job(job)
        return finish_job(job, cfg.load_best_model_at_end, started)


@dataclass
class CheckedJob:
    """What the checks before a run found: its resolved config, its loaded data and the checkpoint it resumes."""

    config: dict[str, Any]  # kept in every checkpoint, so that a resume can see what changed
    datamodule: PairDataModule
    resume_from: str | None = None
    resumed: dict | None = None  # resume_from, loaded (memory-mapped) for the checks before fit


@dataclass
class Job:
    """A checked run, built: what ``fit`` runs, and what :func:`finish` reads afterwards."""

    checked: CheckedJob
    output_dir: Path
    trainer: L.Trainer
    module: L.LightningModule
    evaluation: IREvaluationCallback
    checkpointing: StepCheckpoint
    merging: WeightMerging | None


def check_job(cfg: DictConfig, output_dir: Path) -> CheckedJob:
    """Everything a user can get wrong in the settings, the resume and the data, checked before anything trains or
    is written."""
    check_run_settings(cfg)
    check_optimized_metric(cfg.optimized_metric)
    start_reranker_from_retriever(cfg)
    if (output_dir / "model").exists() and not cfg.overwrite:
        raise FinishedRunError(
            f"{output_dir / 'model'} already holds a finished model. Choose another output_dir, or set "
            "overwrite=true to replace it."
        )
    model_path = cfg.model.get("model_name_or_path")  # a string here; a _target_ (model=tiny) builds a model
    if isinstance(model_path, str):  # checked as the encoder will check it, but before the run writes anything
        check_model_folder(model_path, cfg.model.get("trust_remote_code") is True)
    config = resolved_config(cfg)
    resume_from = resume_checkpoint(cfg.resume, output_dir / "checkpoints")
    resumed = load_checkpoint(resume_from, mmap=True) if resume_from else None
    if resumed is not None:
        check_resume_config(resume_from, resumed, config, cfg.get("resume_changed", False))
        epochs = cfg.trainer.get("max_epochs")
        if epochs == AUTO:  # the same data gets the same recipe: the epochs the checkpoint's run chose
            epochs = (resumed.get(CONFIG_KEY) or {}).get("recipe", {}).get("epochs")
        check_resume_length(resume_from, resumed, cfg.trainer.get("max_steps"), epochs)
    # The data module with its data loaded and checked; a resume must find the data its checkpoint trained on.
    datamodule = build(cfg.data, "data")
    check_pair_data(datamodule, "data")
    datamodule.prepare_data()
    if resumed is not None:
        check_resume_data(resume_from, resumed, datamodule.data_identity(), cfg.get("resume_changed", False))
    return CheckedJob(config, datamodule, resume_from, resumed)


def build_job(cfg: DictConfig, checked: CheckedJob, output_dir: Path) -> Job:
    """The module (mining hard negatives first where ``data.mine`` asks), the callbacks and the trainer."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = checked.datamodule
    module = build_module(cfg, datamodule)
    evaluation = build(cfg.eval, "eval")
    if isinstance(evaluation, RerankEvaluationCallback):
        # The first stage: it mines the reranker's negatives and fetches the candidates the evaluation reranks.
        evaluation.retriever = load_retriever(evaluation.retriever_path_for(module))
        if datamodule.mine:
            rerank = cfg.rerank
            mine_for_training(
                datamodule,
                evaluation.retriever,
                num_negatives=rerank.hard_negatives,
                relative_margin=rerank.relative_margin,
                random_negatives=rerank.random_negatives,
                seed=cfg.seed,
                keep_given=True,
            )
    elif datamodule.mine:
        mine_for_training(datamodule, module.encoder)
    config = checked.config
    if "recipe" in cfg:  # what the default recipe chose, for a resume's length check
        config = {**config, "recipe": OmegaConf.to_container(cfg.recipe)}
    if isinstance(module.loss, EmbeddingLoss):  # a multi-task loss meets its data at the first batch
        check_distillation_data(module.loss, datamodule.has_teacher_scores)
        check_several_positives(module.loss, datamodule.multi_positive)
    checkpointing = build(cfg.checkpoint, "checkpoint", dirpath=str(output_dir / "checkpoints"))
    merging = build(cfg.merge, "merge") if cfg.get("merge") else None
    extras = [build(c, "callbacks") for c in (cfg.callbacks or {}).values()]
    trainer: L.Trainer = build(
        cfg.trainer,
        "trainer",
        default_root_dir=str(output_dir),
        logger=build(cfg.logger, "logger"),
        callbacks=[
            evaluation,
            checkpointing,
            *([merging] if merging is not None else []),
            RecordConfig(config),
            StopTogether(),
            *extras,
            *default_progress_bar(cfg.trainer.get("enable_progress_bar"), extras),
        ],
        plugins=[AtomicCheckpointIO()],
    )
    return Job(checked, output_dir, trainer, module, evaluation, checkpointing, merging)


def fit_job(job: Job) -> None:
    """Trains: from the start, or from the checkpoint it resumes once its weights are known to fit the model."""
    checked = job.checked
    if checked.resumed is not None:
        check_weights_fit(checked.resume_from, checked.resumed, job.module)
        checked.resumed = None  # Lightning loads it again, as it needs it
    job.trainer.fit(job.module, datamodule=checked.datamodule, ckpt_path=checked.resume_from)


def finish_job(job: Job, load_best_model_at_end: bool, started: float) -> dict[str, Any]:
    """After fit: the model to keep, its metrics and its export (:func:`finish`); returns ``metrics.json``'s content."""
    evaluation, checkpointing, merging = job.evaluation, job.checkpointing, job.merging
    output_dir, trainer, module = job.output_dir, job.trainer, job.module
    return finish(trainer, module, evaluation, checkpointing, output_dir, load_best_model_at_end, started, merging)


def build_module(cfg: DictConfig, datamodule: PairDataModule) -> L.LightningModule:
    """The configured LightningModule: encoder (wrapped by ``method``), loss, optimizer and schedule."""
    # method=adapter and method=lora wrap the encoder; their settings are checked before the model loads.
    wrap = build(cfg.method.encoder, "method.encoder") if "encoder" in cfg.method else None
    encoder = build(cfg.model, "model")
    if wrap is not None:  # adapter: a trainable head on the frozen encoder; lora: LoRA layers inside it
        encoder = wrap(encoder)
    elif isinstance(encoder, PrecomputedEmbeddings):
        raise LitEmbedError("model=precomputed has no encoder weights to finetune: use it with method=adapter.")
    if lora_config(encoder) is not None and is_launching_process():
        print(lora_summary(encoder))
    apply_recipe(cfg, datamodule, encoder)
    return build(
        cfg.method,
        "method",
        encoder=encoder,
        # Multi-task data brings a loss for each of its tasks.
        loss=datamodule.losses or build(cfg.loss, "loss"),
        optimizer=build(cfg.optimizer, "optimizer"),
        scheduler=build(cfg.scheduler, "scheduler"),
    )


RECIPE_KEYS = ("trainer.max_epochs", "optimizer.lr", "data.batch_size")


def apply_recipe(cfg: DictConfig, datamodule: PairDataModule, encoder: nn.Module) -> Recipe | None:
    """Fills the config's ``auto`` values with the default recipe's (lit_embed.training.recipe) and logs why.

    The values go into the config as ``recipe``, which checkpoints keep: a resume with ``auto`` knows its length,
    and ``lit-embed-export`` the hyper-parameters. None when nothing is ``auto``.
    """
    auto = {key for key in RECIPE_KEYS if OmegaConf.select(cfg, key) == AUTO}
    auto_batches = [data for data in datamodule.task_modules() if data.batch_size == AUTO]
    auto |= {"data.batch_size"} if auto_batches else set()
    if not auto:
        return None
    num_pairs = datamodule.num_training_pairs
    if num_pairs is None:
        raise LitEmbedError(
            f"{', '.join(sorted(auto))}=auto: the default recipe sizes a run by its number of training pairs, and "
            f"{type(datamodule).__name__} does not count them. Set {' and '.join(sorted(auto))} to numbers."
        )
    num_parameters = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    recipe = default_recipe(num_pairs, num_parameters)
    for data in auto_batches:
        data.batch_size = recipe.batch_size
    with open_dict(cfg):
        if "trainer.max_epochs" in auto:
            cfg.trainer.max_epochs = recipe.epochs
        if "optimizer.lr" in auto:
            cfg.optimizer.lr = recipe.lr
        # The values this run trains with, recorded in checkpoints.
        cfg.recipe = {"epochs": cfg.trainer.max_epochs, "lr": cfg.optimizer.get("lr"), "batch_size": recipe.batch_size}
    if is_launching_process():
        log.info(explain(recipe, num_pairs, num_parameters, auto))  # the console and train.log
    return recipe


def resume_checkpoint(resume: bool | str | None, checkpoint_dir: Path) -> str | None:
    """``resume=true`` -> ``last.ckpt`` of this output_dir; ``resume=auto`` -> the same where there is one (a
    requeued job), else None (its first start); ``resume=PATH`` -> that file; else None."""
    if resume is None or resume is False:
        return None
    if resume == AUTO:
        last = checkpoint_dir / "last.ckpt"
        log.info("resume=auto: %s", f"continuing from {last}" if last.is_file() else "no checkpoint yet, starting")
        return str(last) if last.is_file() else None
    path = checkpoint_dir / "last.ckpt" if resume is True else Path(resume)
    if not path.is_file():
        raise LitEmbedError(
            f"cannot resume: {path} does not exist. Use the output_dir of the interrupted run with resume=true, "
            "point resume=PATH at a .ckpt file, or start a new run without resume."
        )
    return str(path)


def start_reranker_from_retriever(cfg: DictConfig) -> None:
    """``rerank.start_from_retriever``: a reranker that would get a fresh head starts from the retriever's weights,
    which know the domain (on a 600-pair split, 0.74 MRR@10 alone on validation after one epoch, against 0.60 from
    all-MiniLM-L6-v2 itself). A cross-encoder directory keeps its own weights and head."""
    rerank = cfg.get("rerank") or {}
    retriever, start = rerank.get("retriever"), cfg.model.get("model_name_or_path")
    if not (rerank.get("start_from_retriever") and retriever):
        return
    if isinstance(start, str) and has_score_head(start):
        return
    with open_dict(cfg):
        cfg.model.model_name_or_path = retriever
    if is_launching_process():
        log.info("The reranker starts from the retriever's weights, %s (rerank.start_from_retriever).", retriever)


def check_optimized_metric(name: str | None) -> None:
    """Fails before training when ``optimized_metric`` names no validation metric (``val/ndcg@10`` for ``ndcg@10``)."""
    if name is not None and name not in METRIC_NAMES:
        raise LitEmbedError(
            f"optimized_metric={name} is not a validation metric: use one of {', '.join(METRIC_NAMES)}."
        )


def finetune(
    train: str | None = None,
    val: str | None = None,
    *,
    model: str = "minilm",
    method: str = "full",
    epochs: int | None = None,
    batch_size: int | None = None,
    output_dir: str | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """The Python way to run the same job as ``python train.py``, e.g. from a notebook.

    Args:
        train: training data (.json / .jsonl / .csv / ...); None = the offline stdlib dataset.
        val: validation data for the before/after metrics (optional).
        model: a ``conf/model`` choice (``minilm``, ``bge``, ``tiny``, ``precomputed``).
        method: ``full``, ``adapter`` or ``lora``.
        epochs: ``trainer.max_epochs`` (None keeps the config's).
        batch_size: ``data.batch_size`` (None keeps the config's).
        output_dir: where everything goes (default ``outputs/<date>_<time>``).
        overrides: any further ``key=value`` / ``group=choice`` overrides, as on the command line.

    Returns:
        ``metrics.json``'s content: ``{"base": {...}, "final": {...}}``.
    """
    args = [f"model={model}", f"method={method}"]
    if train is not None:
        args += ["data=qa_json", f"data.train_path={train}", f"data.val_path={val if val is not None else 'null'}"]
    args += [f"trainer.max_epochs={epochs}"] if epochs is not None else []
    args += [f"data.batch_size={batch_size}"] if batch_size is not None else []
    args += [f"output_dir={output_dir or datetime.now().strftime('outputs/%Y-%m-%d_%H-%M-%S')}", *overrides]
    cfg = compose_config(args)
    check_added_keys(cfg, args)
    # The same record and log as a Hydra run: .hydra/config.yaml, .hydra/overrides.yaml and train.log.
    check_output_dir(cfg.output_dir)
    with run_log(cfg.output_dir):
        return run(cfg, hydra_record=composed_record(cfg, args))


_job_started: list[bool] = []  # filled by the first job: Hydra's own errors come before it


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def hydra_app(cfg: DictConfig) -> float | None:
    """One job; returns the final ``optimized_metric`` for Hydra's sweepers (None without validation)."""
    _job_started.append(True)
    job = HydraConfig.get()
    # A single run ends with the message and exit 2; a sweep's job records it and the sweep goes on (sweeps.py).
    sweeping = job.mode == RunMode.MULTIRUN
    with sweep_job(job.runtime.output_dir, log) if sweeping else reported("lit-embed-train", log):
        try:
            check_added_keys(cfg, job.overrides.task)
            check_output_dir(cfg.output_dir)
        except LitEmbedError:
            keep_log_files_out_of(job.runtime.output_dir)  # not the run's folder yet: it may be the user's
            raise
        record = hydra_record(cfg)  # the config as composed, before output_dir becomes the job's folder
        # In a sweep Hydra gives each job its own folder under output_dir; that folder is the job's output_dir.
        with open_dict(cfg):
            cfg.output_dir = job.runtime.output_dir
        metrics = run(cfg, hydra_record=record)
        return metrics["final"][cfg.optimized_metric] if "final" in metrics and cfg.optimized_metric else None
    return None  # sweep_job recorded a failure; Optuna counts a trial without a value as failed


def main() -> None:
    """``python train.py`` / ``lit-embed-train``: every user mistake exits 2 with one message."""
    with reported("lit-embed-train"):
        for override in sys.argv[1:]:
            key, _, value = override.partition("=")
            if key.lstrip("+") == "output_dir":  # before Hydra makes the folder (or fails to, on a file)
                check_output_path(value)
    register_resolvers()
    try:
        hydra_app()
    except SystemExit as exit_:
        # Hydra reports a config it cannot compose (unknown key, unknown choice) itself and exits 1 before any
        # job starts; that is a user mistake like any other.
        if exit_.code == 1 and not _job_started:
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
