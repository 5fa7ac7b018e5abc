"""``lit-embed-export CKPT OUT_DIR`` (or ``python -m lit_embed.export``): a sentence-transformers directory from any
lit_embed checkpoint, rebuilt from the checkpoint alone. From a LoRA checkpoint: the merged model in OUT_DIR and the
adapter alone in ``--lora-dir`` (default ``OUT_DIR-lora``). From an adapter checkpoint that maps queries only: the
head as LlamaIndex's ``AdapterEmbeddingModel`` reads it too, in ``--llamaindex-dir`` (default
``OUT_DIR-llamaindex_adapter``)."""

from __future__ import annotations

import argparse
import os
from functools import partial

from lit_embed.console import quiet_third_party_output
from lit_embed.errors import LitEmbedError, reported
from lit_embed.model_card import checkpoint_facts, write_model_card
from lit_embed.models import adapters
from lit_embed.models.adapted import AdaptedEncoder, warn_query_route
from lit_embed.models.encoder import Encoder
from lit_embed.models.lora import LoRA, lora_config, save_lora
from lit_embed.models.saving import to_sentence_transformers
from lit_embed.training.checkpoint_io import load_checkpoint, load_encoder_weights


def encoder_from_checkpoint(path: str | os.PathLike) -> Encoder | AdaptedEncoder:
    """Rebuilds the trained encoder (full, adapter or LoRA) from a lit_embed checkpoint (``weights_only=True``)."""
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
        if "lora_config" in checkpoint:  # method=lora: the base model again, with the same LoRA layers
            encoder = LoRA(**checkpoint["lora_config"])(encoder)
    load_encoder_weights(encoder, checkpoint)
    return encoder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lit-embed-export", description="Write a sentence-transformers model from a lit_embed checkpoint."
    )
    parser.add_argument("checkpoint", help="a .ckpt written during training, e.g. OUTPUT_DIR/checkpoints/last.ckpt")
    parser.add_argument("output_dir", help="where to write the sentence-transformers directory")
    parser.add_argument(
        "--lora-dir", help="from a LoRA checkpoint: where the adapter alone goes (default: OUTPUT_DIR-lora)"
    )
    parser.add_argument(
        "--llamaindex-dir",
        help="from an adapter checkpoint: where LlamaIndex's AdapterEmbeddingModel files go "
        "(default: OUTPUT_DIR-llamaindex_adapter)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model in output_dir")
    args = parser.parse_args(argv)
    quiet_third_party_output()
    with reported("lit-embed-export"):
        encoder = encoder_from_checkpoint(args.checkpoint)
        lora_path = None
        if lora_config(encoder) is None:
            path = to_sentence_transformers(encoder, args.output_dir, args.overwrite)
            llamaindex_dir = args.llamaindex_dir or f"{str(args.output_dir).rstrip('/')}-llamaindex_adapter"
            if isinstance(encoder, AdaptedEncoder) and encoder.save_llamaindex_adapter(llamaindex_dir):
                print(f"Wrote the LlamaIndex adapter to {llamaindex_dir} (AdapterEmbeddingModel).")
                warn_query_route(encoder, path, llamaindex_dir)
        else:
            lora_dir = args.lora_dir or f"{str(args.output_dir).rstrip('/')}-lora"
            path, lora_path = save_lora(encoder, args.output_dir, lora_dir, args.overwrite)
            print(f"Wrote the LoRA adapter alone to {lora_path} (PEFT: load_adapter onto the base model).")
        checkpoint = load_checkpoint(args.checkpoint, mmap=True)
        write_model_card(path, checkpoint_facts(args.checkpoint, checkpoint, path, lora_path))
    print(f"Wrote {path}; load it with SentenceTransformer({str(path)!r}).")


if __name__ == "__main__":
    main()
