"""``lit-embed-export CKPT OUT_DIR`` (or ``python -m lit_embed.export``): a sentence-transformers directory from any
lit_embed checkpoint, rebuilt from the checkpoint alone."""

from __future__ import annotations

import argparse
import os
from functools import partial

from lit_embed.console import quiet_third_party_output
from lit_embed.errors import LitEmbedError, reported
from lit_embed.models import adapters
from lit_embed.models.adapted import AdaptedEncoder
from lit_embed.models.encoder import Encoder
from lit_embed.models.saving import to_sentence_transformers
from lit_embed.training.checkpoint_io import load_checkpoint, load_encoder_weights


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
    load_encoder_weights(encoder, checkpoint)
    return encoder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lit-embed-export", description="Write a sentence-transformers model from a lit_embed checkpoint."
    )
    parser.add_argument("checkpoint", help="a .ckpt written during training, e.g. OUTPUT_DIR/checkpoints/last.ckpt")
    parser.add_argument("output_dir", help="where to write the sentence-transformers directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model in output_dir")
    args = parser.parse_args(argv)
    quiet_third_party_output()
    with reported("lit-embed-export"):
        path = to_sentence_transformers(encoder_from_checkpoint(args.checkpoint), args.output_dir, args.overwrite)
    print(f"Wrote {path}; load it with SentenceTransformer({str(path)!r}).")


if __name__ == "__main__":
    main()
