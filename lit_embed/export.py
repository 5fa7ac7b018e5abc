"""Writing finetuned models where other tools can load them.

Command line: ``python -m lit_embed.export CKPT OUT_DIR`` writes a sentence-transformers directory from any
lit_embed checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path

from lit_embed.callbacks.checkpointing import load_checkpoint
from lit_embed.errors import LitEmbedError
from lit_embed.models import adapters
from lit_embed.models.adapters import AdaptedEncoder
from lit_embed.models.encoder import Encoder, weights_are_finite


def to_sentence_transformers(
    encoder: Encoder | AdaptedEncoder, path: str | os.PathLike, overwrite: bool = True
) -> Path:
    """Saves ``encoder`` as a sentence-transformers directory that ``SentenceTransformer(path)`` loads as is.

    The directory is written next to its destination and renamed into place, so a crash mid-save never
    leaves a half-written model where a good one was.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise LitEmbedError(f"{path} already holds a model. Choose another output directory or set overwrite=true.")
    if not weights_are_finite(encoder):
        raise LitEmbedError(f"refusing to write {path}: the model's weights contain NaN or inf values.")
    staging = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        encoder.save(staging)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            staging.rename(path)
            shutil.rmtree(old)
        else:
            staging.rename(path)
    except OSError as err:
        raise LitEmbedError(
            f"could not write the model to {path}: {err.strerror or err}. Nothing was replaced; the checkpoints are "
            "intact. Free disk space or fix permissions, then run again with resume=true."
        ) from err
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return path


def load_encoder_weights(encoder: Encoder | AdaptedEncoder, checkpoint: dict) -> Encoder | AdaptedEncoder:
    """Copies a training checkpoint's encoder weights into ``encoder`` (strict: every weight must match)."""
    prefix = "encoder."
    weights = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    encoder.load_state_dict(weights, strict=True)
    return encoder


def encoder_from_checkpoint(path: str | os.PathLike) -> Encoder | AdaptedEncoder:
    """Rebuilds the trained encoder (full or adapter) from a lit_embed checkpoint alone (``weights_only=True``)."""
    checkpoint = load_checkpoint(path)
    if "encoder_config" not in checkpoint:
        raise LitEmbedError(f"{path} is not a lit_embed training checkpoint (it has no 'encoder_config').")
    config = checkpoint["encoder_config"]
    if "adapter" in config:  # method=adapter: the frozen base model plus the trained head
        head = dict(config["adapter"])
        adapter_class = getattr(adapters, head.pop("class"))
        if config.get("base_class") == "PrecomputedEmbeddings":
            raise LitEmbedError(
                f"{path} was trained on precomputed vectors: there is no text model to export. The trained head "
                "is in the run's model/adapter.safetensors and llamaindex_adapter/."
            )
        encoder = AdaptedEncoder(Encoder(**config["base"]), partial(adapter_class, **head), cache_dir=None)
    else:
        encoder = Encoder(**config)
    return load_encoder_weights(encoder, checkpoint)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a sentence-transformers model from a lit_embed checkpoint.")
    parser.add_argument("checkpoint", help="a .ckpt written during training, e.g. OUTPUT_DIR/checkpoints/last.ckpt")
    parser.add_argument("output_dir", help="where to write the sentence-transformers directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model in output_dir")
    args = parser.parse_args(argv)
    try:
        path = to_sentence_transformers(encoder_from_checkpoint(args.checkpoint), args.output_dir, args.overwrite)
    except (LitEmbedError, FileNotFoundError) as err:
        parser.exit(2, f"lit_embed.export: error: {err}\n")
    print(f"Wrote {path}; load it with SentenceTransformer({str(path)!r}).")


if __name__ == "__main__":
    main()
