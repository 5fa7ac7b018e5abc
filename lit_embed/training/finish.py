"""After ``trainer.fit``: the model to keep, its metrics, its export. Shared by the Hydra app and LightningCLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L

from lit_embed.data.datamodule import trainer_data
from lit_embed.distributed import full_parameters
from lit_embed.evaluation.rerank import write_fusion
from lit_embed.evaluation.retrieval import format_metrics_table
from lit_embed.files import write_text_atomic
from lit_embed.model_card import run_facts, write_model_card
from lit_embed.models.adapted import AdaptedEncoder, warn_query_route
from lit_embed.models.lora import lora_config, save_lora
from lit_embed.models.saving import to_sentence_transformers
from lit_embed.training.callbacks.checkpointing import StepCheckpoint
from lit_embed.training.callbacks.ir_eval import IREvaluationCallback
from lit_embed.training.callbacks.rerank_eval import RerankEvaluationCallback, fusion_summary
from lit_embed.training.checkpoint_io import load_checkpoint, load_encoder_weights
from lit_embed.training.merging import WeightMerging, merge_summary
from lit_embed.training.report import write_run_report


def finish(
    trainer: L.Trainer,
    module: L.LightningModule,
    evaluation: IREvaluationCallback | None,
    checkpointing: StepCheckpoint | None,
    output_dir: Path,
    load_best_model_at_end: bool = True,
    started: float | None = None,
    merging: WeightMerging | None = None,
) -> dict[str, Any]:
    """Picks the model to keep, scores it, exports it and writes ``metrics.json``.

    Args:
        trainer: the trainer that ran ``fit``.
        module: the trained module; its ``encoder`` is exported.
        evaluation: the run's IR evaluation callback (None: no metrics).
        checkpointing: the run's checkpoint callback (None: the last step is exported).
        output_dir: the run's directory; ``model/`` and ``metrics.json`` go there.
        load_best_model_at_end: export the best checkpoint's weights instead of the last step's.
        started: ``time.time()`` when the run started, for the model card's wall time (None: not stated).
        merging: the run's weight merging (None: the finetuned weights are exported as they are).

    Returns:
        ``metrics.json``'s content: ``{"base": {...}, "final": {..., "step": N}}``, or ``{}`` without validation;
        with merging also ``"finetuned"`` (plain finetuning's metrics), ``"merge"`` (every α's) and ``final.alpha``;
        ``"skipped"``, when anything was left out as wrong on its own: per file, its ``records``, the
        ``wrong_records`` among them, the ``problems`` left out, and per kind their count and first ids.
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
            final = evaluation.metrics_at(step) or evaluation.evaluate(trainer, module, step)
            metrics = {"base": evaluation.metrics_at(0), "final": {**final, "step": step}}
            merge = merging.choose(trainer, module, evaluation, step, final) if merging is not None else None
            if merge is not None:
                chosen = merge["alphas"][str(merge["chosen"])]
                metrics = {
                    "base": metrics["base"],
                    "finetuned": {**final, "step": step},
                    "final": {**chosen, "step": step, "alpha": merge["chosen"]},
                    "merge": merge,
                }
        if isinstance(evaluation, RerankEvaluationCallback) and metrics:
            # The shipped pipeline's weight of the reranker against the retriever, chosen for the model kept.
            fusion = evaluation.choose_fusion(trainer, module, step)
            if fusion is not None:
                metrics["fusion"] = fusion
                metrics["pipeline"] = {**fusion["by_weight"][str(fusion["weight"])], "weight": fusion["weight"]}
        data = trainer_data(trainer)
        skipped = data.skipped_records() if data is not None else {}
        report = {**metrics, "skipped": skipped} if skipped else metrics
        if trainer.is_global_zero:
            if lora_config(encoder) is not None:  # model/: the updates merged in; lora/: the updates alone
                model_dir, lora_dir = save_lora(encoder, output_dir / "model", output_dir / "lora", overwrite=True)
                print(f"LoRA adapter saved to {lora_dir} (PEFT: load_adapter onto the base model).")
            else:
                model_dir = to_sentence_transformers(encoder, output_dir / "model", overwrite=True)
            adapter_dir = output_dir / "llamaindex_adapter"
            if isinstance(encoder, AdaptedEncoder) and encoder.save_llamaindex_adapter(adapter_dir):
                print(f"LlamaIndex adapter saved to {adapter_dir} (AdapterEmbeddingModel).")
                warn_query_route(encoder, model_dir, adapter_dir)
            if "fusion" in metrics:
                write_fusion(model_dir, metrics["fusion"])
            write_text_atomic(output_dir / "metrics.json", json.dumps(report, indent=2) + "\n")
            facts = run_facts(trainer, module, report, step, model_dir, output_dir, started)
            write_model_card(model_dir, facts)
            write_run_report(trainer, evaluation, step, report, output_dir, facts)
            table = {"base": metrics.get("base"), "finetuned": metrics.get("finetuned"), "final": metrics.get("final")}
            print(format_metrics_table({name: m for name, m in table.items() if m}))
            if "merge" in metrics:
                print(merge_summary(metrics["merge"], metrics["finetuned"]))
            if "fusion" in metrics:
                print(fusion_summary(metrics["fusion"]))
            loader = "CrossEncoder" if getattr(encoder, "reads_pairs", False) else "SentenceTransformer"
            print(f"Model (step {step}) saved to {model_dir}; load it with {loader}({str(model_dir)!r}).")
            if checkpointing is not None:
                print(checkpointing.kept_summary())
    return report
