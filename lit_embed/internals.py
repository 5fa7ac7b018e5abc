"""Every read of another framework's private or undocumented state, each in one small function that says why lit_embed
needs it: a release that moves one breaks here, in one place, and the rest of the package calls these names.

Nothing here imports lit_embed, and each framework is imported only inside the function that reads it, so that
importing this module costs nothing (``lit_embed.llamaindex`` imports it without Lightning).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# --- Lightning ---------------------------------------------------------------------------------------------------


def uses_distributed_sampler(trainer: Any) -> bool:
    """Whether Lightning will wrap the training loader's sampler in a DistributedSampler."""
    # The Trainer keeps its use_distributed_sampler argument only on its private accelerator connector; lit_embed
    # shards its no-duplicates batches itself and must refuse a second sharding on top.
    return bool(getattr(trainer._accelerator_connector, "use_distributed_sampler", False))


@dataclass(frozen=True)
class LoopPosition:
    """Where ``fit`` stands, in Lightning's own counts (its checkpoints save them as ``loops.fit_loop``).

    ``epochs_*``: epochs started / processed / completed; ``batches``: batches processed of the epoch in progress (or
    of the one that just ended); ``last_batch``: whether that epoch's last batch has run.
    """

    epochs_started: int
    epochs_processed: int
    epochs_completed: int
    batches: int
    last_batch: bool


def fit_position(trainer: Any) -> LoopPosition:
    """Where the running ``fit`` stands (see :class:`LoopPosition`)."""
    # The fit loop's progress counters are not public API, but they are what Lightning resumes from: a data module
    # that saves its own position must save the one Lightning restores.
    epochs = trainer.fit_loop.epoch_progress.current
    batches = trainer.fit_loop.epoch_loop.batch_progress
    return LoopPosition(
        epochs.started, epochs.processed, epochs.completed, batches.current.processed, batches.is_last_batch
    )


def saved_fit_loop(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The fit loop's state in a Lightning checkpoint, as the checkpoint holds it (None: not a training checkpoint)."""
    # Lightning writes its loops' progress under this undocumented key; a resume is checked and rewritten there.
    loops = checkpoint.get("loops")
    return loops["fit_loop"] if loops is not None else None


def saved_position(fit_loop: dict[str, Any]) -> LoopPosition:
    """Where the ``fit`` that saved ``fit_loop`` (see :func:`saved_fit_loop`) stood."""
    # The layout is that of Lightning's _Progress/_BatchProgress state dicts.
    epochs = fit_loop["epoch_progress"]["current"]
    batches = fit_loop["epoch_loop.batch_progress"]
    return LoopPosition(
        epochs["started"],
        epochs["processed"],
        epochs["completed"],
        batches["current"]["processed"],
        batches["is_last_batch"],
    )


def reopen_saved_epoch(fit_loop: dict[str, Any]) -> None:
    """Counts the epoch that the saved ``fit_loop`` closed as not yet done, so that a resume goes on within it."""
    # Lightning counts the epoch training stopped in as done, even when max_steps stopped it mid-epoch.
    for count in fit_loop["epoch_progress"].values():
        count["processed"] -= 1
        count["completed"] -= 1


def clear_saved_batches(fit_loop: dict[str, Any]) -> None:
    """Clears the saved ``fit_loop``'s batch counts of an epoch that ran out, so that a resume starts the next one at
    its first batch."""
    # Lightning would otherwise take the epoch, all of whose batches ran, for the next one with none left.
    batches = fit_loop["epoch_loop.batch_progress"]
    batches["current"] = dict.fromkeys(batches["current"], 0)
    batches["is_last_batch"] = False


def stop_after_this_step(trainer: Any) -> None:
    """Makes ``fit`` stop after the step in progress as it does after SIGTERM: Lightning raises its
    ``SIGTERMException`` where its loops' counts and the schedulers are up to date, so the saved checkpoint resumes
    exactly."""
    # The flag its SIGTERM handler sets; lit_embed decides when to set it (on every rank at the same step).
    trainer._signal_connector.received_sigterm = True


def rich_progress_available() -> bool:
    """Whether Lightning's RichProgressBar can run (``rich`` is installed, in a version Lightning takes)."""
    # Lightning's own check of the rich version it needs; a RichProgressBar without it fails at construction.
    from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

    return bool(_RICH_AVAILABLE)


# --- torch -------------------------------------------------------------------------------------------------------


def steps_check_nonfinite(optimizer: Any) -> bool:
    """Whether ``optimizer.step`` can itself skip a step whose gradients are not finite (torch's fused optimizers)."""
    # torch marks such optimizers with this private flag, which its GradScaler reads for the same purpose.
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


@contextlib.contextmanager
def dynamo_recompile_limit(limit: int) -> Iterator[None]:
    """Compiled calls inside the block may recompile up to ``limit`` times per code object (only there: no global
    setting changes)."""
    # transformers wraps several layer methods in one decorator function, whose code dynamo caches once for all of
    # them (8 entries by default), so a compiled model's training and evaluation calls need more.
    import torch

    with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, limit)):
        yield


# --- transformers ------------------------------------------------------------------------------------------------


def attention_implementation(config: Any) -> str | None:
    """The attention implementation a loaded transformers model runs ("sdpa", "eager", ...)."""
    # Public to choose at load time (attn_implementation=), private to read afterwards.
    return config._attn_implementation


def set_attention_implementation(config: Any, name: str) -> None:
    """Switches a loaded model's attention to a registered one."""
    # The private attribute is the one every layer reads at each call; transformers leaves it out of config.json,
    # so a saved model never names lit_embed's attention.
    config._attn_implementation = name


# --- Hydra -------------------------------------------------------------------------------------------------------


def failed_job_error(job_return: Any) -> BaseException:
    """The exception that a failed Hydra job raised."""
    # JobReturn.return_value re-raises it; the private field holds it without raising.
    return job_return._return_value


# --- LlamaIndex --------------------------------------------------------------------------------------------------


def llamaindex_adds_residual(adapter_model: Any) -> bool:
    """Whether LlamaIndex's ``TwoLayerNN`` adapter adds its input to its output."""
    # TwoLayerNN keeps its add_residual argument only as a private attribute.
    return bool(adapter_model._add_residual)


def llamaindex_prompts(embed_model: Any) -> dict[str, str]:
    """The prompts LlamaIndex's ``HuggingFaceEmbedding`` encodes with (empty when it has none)."""
    # They are those of its sentence-transformers model, which it holds as a private attribute.
    return getattr(getattr(embed_model, "_model", None), "prompts", None) or {}
