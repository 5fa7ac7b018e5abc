"""The Hydra app: compose the config, build every object from ``_target_``, evaluate, finetune, export."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
import transformers
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from lit_embed.callbacks.checkpointing import AtomicCheckpointIO, StepCheckpoint, load_checkpoint
from lit_embed.callbacks.ir_eval import METRIC_TABLE_KEYS, IREvaluationCallback
from lit_embed.data.formats import write_text_atomic
from lit_embed.distributed import full_parameters
from lit_embed.errors import LitEmbedError
from lit_embed.evaluation.ir import DEFAULT_K
from lit_embed.export import load_encoder_weights, to_sentence_transformers
from lit_embed.models.adapters import AdaptedEncoder
from lit_embed.models.precomputed import PrecomputedEmbeddings

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def bf16_if_gpu() -> str:
    """Lightning precision for ``trainer=default``: bf16 autocast where the GPU supports it, else fp32."""
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


OmegaConf.register_new_resolver("bf16_if_gpu", bf16_if_gpu, replace=True)


def quiet_third_party_output() -> None:
    """Keeps the console to our progress bar and results: no per-file weight-loading bars or save notices."""
    transformers.logging.disable_progress_bar()
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)


def build(config: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, but a ``LitEmbedError`` raised by a constructor reaches the user unwrapped."""
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, LitEmbedError):
            raise err.__cause__ from None
        raise


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs one finetuning job as configured and returns ``metrics.json``'s content."""
    quiet_third_party_output()
    output_dir = Path(cfg.output_dir)
    # Everything a user can get wrong is checked before training starts or anything is written.
    if (output_dir / "model").exists() and not cfg.overwrite:
        raise LitEmbedError(
            f"{output_dir / 'model'} already holds a finished model. Choose another output_dir, or set "
            "overwrite=true to replace it."
        )
    resume_from = resume_checkpoint(cfg.resume, output_dir / "checkpoints")
    datamodule = build(cfg.data)
    datamodule.prepare_data()
    L.seed_everything(cfg.seed, workers=True)

    module = build_module(cfg, datamodule)
    evaluation = build(cfg.eval)
    checkpointing = build(cfg.checkpoint, dirpath=str(output_dir / "checkpoints"))
    trainer: L.Trainer = build(
        trainer_arguments(cfg),
        default_root_dir=str(output_dir),
        logger=build(cfg.logger),
        callbacks=[evaluation, checkpointing, *(build(c) for c in (cfg.callbacks or {}).values())],
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    return finish(trainer, module, evaluation, checkpointing, output_dir, cfg.load_best_model_at_end)


def build_module(cfg: DictConfig, datamodule: L.LightningDataModule) -> L.LightningModule:
    """The configured LightningModule: encoder (wrapped by ``method``), loss, optimizer and schedule."""
    encoder = build(cfg.model)
    if "encoder" in cfg.method:  # method=adapter wraps the encoder: frozen, with a trainable head
        encoder = build(cfg.method.encoder)(encoder)
    elif isinstance(encoder, PrecomputedEmbeddings):
        raise LitEmbedError("model=precomputed has no encoder weights to finetune: use it with method=adapter.")
    return build(
        cfg.method,
        encoder=encoder,
        # Multi-task data brings a loss for each of its tasks.
        loss=getattr(datamodule, "losses", None) or build(cfg.loss),
        optimizer=build(cfg.optimizer),
        scheduler=build(cfg.scheduler),
        skip_nonfinite=cfg.trainer.get("skip_nonfinite", False),
    )


def trainer_arguments(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.trainer`` without lit_embed's own keys, which the module takes, not ``lightning.Trainer``."""
    return {key: value for key, value in cfg.trainer.items() if key != "skip_nonfinite"}


def finish(
    trainer: L.Trainer,
    module: L.LightningModule,
    evaluation: IREvaluationCallback | None,
    checkpointing: StepCheckpoint | None,
    output_dir: Path,
    load_best_model_at_end: bool = True,
) -> dict[str, Any]:
    """After ``trainer.fit``: picks the model to keep, scores it, exports it and writes ``metrics.json``.

    Shared by the Hydra app and ``lit-embed fit`` (LightningCLI), so both leave the same files.

    Args:
        trainer: the trainer that ran ``fit``.
        module: the trained module; its ``encoder`` is exported.
        evaluation: the run's IR evaluation callback (None: no metrics).
        checkpointing: the run's checkpoint callback (None: the last step is exported).
        output_dir: the run's directory; ``model/`` and ``metrics.json`` go there.
        load_best_model_at_end: export the best checkpoint's weights instead of the last step's.

    Returns:
        ``metrics.json``'s content: ``{"base": {...}, "final": {..., "step": N}}``, or ``{}`` without validation.
    """
    # Under FSDP every rank gathers the whole weights for this; other strategies hold them already.
    with full_parameters(trainer):
        encoder = module.encoder
        step = trainer.global_step
        if load_best_model_at_end and checkpointing is not None and checkpointing.best is not None:
            step = checkpointing.best["step"]
            load_encoder_weights(encoder, load_checkpoint(checkpointing.best["path"]))
        metrics: dict[str, Any] = {}
        if evaluation is not None and evaluation.history:
            # The best step may have been picked by a monitor other than the IR metrics: then measure it now.
            final = evaluation.metrics_at(step) or evaluation.evaluate(trainer, module)
            metrics = {"base": evaluation.metrics_at(0), "final": {**final, "step": step}}
        if trainer.is_global_zero:
            model_dir = to_sentence_transformers(encoder, output_dir / "model", overwrite=True)
            adapter_dir = output_dir / "llamaindex_adapter"
            if isinstance(encoder, AdaptedEncoder) and encoder.save_llamaindex_adapter(adapter_dir):
                print(f"LlamaIndex adapter saved to {adapter_dir} (AdapterEmbeddingModel).")
            write_text_atomic(output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
            print(format_metrics_table(metrics))
            print(f"Model (step {step}) saved to {model_dir}; load it with SentenceTransformer({str(model_dir)!r}).")
    return metrics


def resume_checkpoint(resume: bool | str | None, checkpoint_dir: Path) -> str | None:
    """``resume=true`` -> ``last.ckpt`` of this output_dir; ``resume=PATH`` -> that file; else None."""
    if resume is None or resume is False:
        return None
    path = checkpoint_dir / "last.ckpt" if resume is True else Path(resume)
    if not path.is_file():
        raise LitEmbedError(
            f"cannot resume: {path} does not exist. Use the output_dir of the interrupted run with resume=true, "
            "point resume=PATH at a .ckpt file, or start a new run without resume."
        )
    return str(path)


def format_metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    """A small before/after table of the headline retrieval metrics."""
    if not metrics:
        return "No validation set: nothing to compare."
    columns = list(metrics)
    lines = [
        f"{'metric':<14}" + "".join(f"{c:>10}" for c in columns) + (f"{'change':>10}" if len(columns) == 2 else "")
    ]
    for key in METRIC_TABLE_KEYS:
        values = [metrics[c][key] for c in columns]
        change = f"{values[-1] - values[0]:>+10.4f}" if len(values) == 2 else ""
        lines.append(f"{key:<14}" + "".join(f"{v:>10.4f}" for v in values) + change)
    return "\n".join(lines)


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
        method: ``full`` or ``adapter``.
        epochs: ``trainer.max_epochs`` (None keeps the config's).
        batch_size: ``data.batch_size`` (None keeps the config's).
        output_dir: where everything goes (default ``outputs/<date>_<time>``).
        overrides: any further ``key=value`` / ``group=choice`` overrides, as on the command line.

    Returns:
        ``metrics.json``'s content: ``{"base": {...}, "final": {...}}``.
    """
    from hydra import compose, initialize_config_dir

    args = [f"model={model}", f"method={method}"]
    if train is not None:
        args += ["data=qa_json", f"data.train_path={train}", f"data.val_path={val if val is not None else 'null'}"]
    args += [f"trainer.max_epochs={epochs}"] if epochs is not None else []
    args += [f"data.batch_size={batch_size}"] if batch_size is not None else []
    args += [f"output_dir={output_dir or datetime.now().strftime('outputs/%Y-%m-%d_%H-%M-%S')}", *overrides]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=args)
    return run(cfg)


def check_optimized_metric(name: str | None) -> None:
    """Fails before training when ``optimized_metric`` names no validation metric (``val/ndcg@10`` for ``ndcg@10``)."""
    names = [f"{metric}@{k}" for metric, ks in DEFAULT_K.items() for k in ks]
    if name is not None and name not in names:
        raise LitEmbedError(f"optimized_metric={name} is not a validation metric: use one of {', '.join(names)}.")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """``python train.py``; returns the final ``optimized_metric`` for Hydra's sweepers (None without validation)."""
    # In a sweep Hydra gives each job its own folder under output_dir; that folder is the job's output_dir.
    with open_dict(cfg):
        cfg.output_dir = HydraConfig.get().runtime.output_dir
    try:
        check_optimized_metric(cfg.optimized_metric)
        metrics = run(cfg)
    except LitEmbedError as err:
        log.error("%s", err)
        sys.exit(2)
    except SIGTERMException:
        log.error("Stopped by SIGTERM; the checkpoint is saved. Continue with resume=true.")
        sys.exit(143)
    return metrics["final"][cfg.optimized_metric] if metrics and cfg.optimized_metric else None


if __name__ == "__main__":
    main()
