"""Checkpoint files: written atomically, read with ``weights_only=True``, and what a checkpoint holds of the encoder."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from lit_embed.errors import LitEmbedError
from lit_embed.files import open_atomic
from lit_embed.models.lora import lora_weight_names


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file, syncs it, then renames it into place; loads with
    ``weights_only=True`` so a checkpoint file cannot run code.

    A crash or a full disk mid-write leaves the previous checkpoints as they were.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        path = Path(path)
        try:
            with open_atomic(path, binary=True) as f:
                torch.save(checkpoint, f)
        except OSError as err:
            raise _unwritable(path, err) from err

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Any | None = None,
        weights_only: bool | None = None,
        mmap: bool = False,
    ) -> dict:
        if not Path(path).is_file():
            raise LitEmbedError(
                f"checkpoint {path} does not exist. Check the path (checkpoints are OUTPUT_DIR/checkpoints/)."
            )
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            raise LitEmbedError(
                f"{path} holds objects other than tensors and plain containers, so it was not loaded: lit_embed never "
                f"runs code from a checkpoint (torch.load with weights_only=True). Details: {str(err).splitlines()[0]}"
            ) from err


def _unwritable(path: Path, err: OSError) -> LitEmbedError:
    return LitEmbedError(
        f"could not write checkpoint {path}: {err.strerror or err}. The checkpoints already in {path.parent} are "
        "intact. Free disk space or fix permissions, then continue with resume=true."
    )


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """Reads a lit_embed checkpoint safely (tensors and plain containers only).

    ``mmap=True`` maps the tensors instead of reading them: cheap when only the settings or shapes are wanted.
    """
    try:
        return AtomicCheckpointIO().load_checkpoint(path, mmap=mmap)
    except RuntimeError as err:
        raise LitEmbedError(f"{path} is not a readable checkpoint ({str(err).splitlines()[0]}).") from err


# What the best model needs once it is no longer the newest checkpoint: its weights for load_best_model_at_end,
# and what lit-embed-export rebuilds the encoder from. The optimizer state (twice the weights) only resumes.
WEIGHTS_ONLY_KEYS = (
    "encoder_config",
    "lora_config",
    "global_step",
    "epoch",
    "lit_embed_config",
    "pytorch-lightning_version",
)


def keep_weights_only(path: str | os.PathLike) -> int:
    """Rewrites a training checkpoint (atomically) with only its encoder's weights; returns the bytes saved."""
    before = Path(path).stat().st_size
    checkpoint = load_checkpoint(path, mmap=True)
    slim = {key: checkpoint[key] for key in WEIGHTS_ONLY_KEYS if key in checkpoint}
    slim["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("encoder.")}
    slim["weights_only_best"] = True  # a resume from it is refused with a message, not a page of missing keys
    AtomicCheckpointIO().save_checkpoint(slim, path)
    return before - Path(path).stat().st_size


def load_encoder_weights(encoder: nn.Module, checkpoint: dict[str, Any]) -> nn.Module:
    """Copies a training checkpoint's encoder weights into ``encoder`` (strict: every weight must match).

    A LoRA encoder's checkpoint holds its LoRA weights only, and exactly those; the frozen base stays as loaded.
    """
    prefix = "encoder."
    weights = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    lora_names = lora_weight_names(encoder)
    if lora_names is None:
        encoder.load_state_dict(weights, strict=True)
        return encoder
    if set(weights) != lora_names:
        differ = sorted(lora_names.symmetric_difference(weights))
        raise LitEmbedError(
            f"the checkpoint's encoder weights are not this model's LoRA weights ({len(differ)} differ, e.g. "
            f"{differ[:2]}): use the checkpoint with the model and lora.* settings it was trained with."
        )
    encoder.load_state_dict(weights, strict=False)
    return encoder
