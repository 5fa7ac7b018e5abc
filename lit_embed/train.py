"""The Hydra app: compose the config, build every object from ``_target_``, evaluate, finetune, export."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
import transformers
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from lit_embed.callbacks.checkpointing import AtomicCheckpointIO, load_checkpoint
from lit_embed.callbacks.ir_eval import METRIC_TABLE_KEYS
from lit_embed.data.formats import write_text_atomic
from lit_embed.export import load_encoder_weights, to_sentence_transformers

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


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs one finetuning job as configured and returns ``metrics.json``'s content."""
    quiet_third_party_output()
    output_dir = Path(cfg.output_dir)
    resume_from = resume_checkpoint(cfg.resume, output_dir / "checkpoints")
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)

    encoder = instantiate(cfg.model)
    module = instantiate(
        cfg.method,
        encoder=encoder,
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler),
    )
    datamodule = instantiate(cfg.data)
    evaluation = instantiate(cfg.eval)
    checkpointing = instantiate(cfg.checkpoint, dirpath=str(output_dir / "checkpoints"))
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        default_root_dir=str(output_dir),
        logger=instantiate(cfg.logger),
        callbacks=[evaluation, checkpointing],
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)

    step = trainer.global_step
    if cfg.load_best_model_at_end and checkpointing.best is not None:
        step = checkpointing.best["step"]
        load_encoder_weights(encoder, load_checkpoint(checkpointing.best["path"]))
    metrics: dict[str, Any] = {}
    if evaluation.history:
        # The best step may have been picked by a monitor other than the IR metrics: then measure it now.
        final = evaluation.metrics_at(step) or evaluation.evaluate(trainer, module)
        metrics = {"base": evaluation.metrics_at(0), "final": {**final, "step": step}}
    if trainer.is_global_zero:
        model_dir = to_sentence_transformers(encoder, output_dir / "model")
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
        raise FileNotFoundError(
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


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    # In a sweep Hydra gives each job its own folder under output_dir; that folder is the job's output_dir.
    with open_dict(cfg):
        cfg.output_dir = HydraConfig.get().runtime.output_dir
    run(cfg)


if __name__ == "__main__":
    main()
