"""``lit-embed-export CKPT OUT_DIR`` (or ``python -m lit_embed.export``): a sentence-transformers directory from any
lit_embed checkpoint, rebuilt from the checkpoint alone. From a LoRA checkpoint: the merged model in OUT_DIR and the
adapter alone in ``--lora-dir`` (default ``OUT_DIR-lora``). From an adapter checkpoint that maps queries only: the
head as LlamaIndex's ``AdapterEmbeddingModel`` reads it too, in ``--llamaindex-dir`` (default
``OUT_DIR-llamaindex_adapter``).

``--backend onnx`` adds the transformer as ONNX (``OUT_DIR/onnx/model.onnx``; ``--quantize int8`` also an int8 copy);
then CKPT may also be a sentence-transformers directory, such as a run's ``model/``, copied to OUT_DIR first."""

from __future__ import annotations

import argparse
import json
import os
from functools import partial
from pathlib import Path

from lit_embed.console import quiet_third_party_output
from lit_embed.errors import LitEmbedError, reported
from lit_embed.files import write_directory_atomic
from lit_embed.model_card import checkpoint_facts, write_model_card
from lit_embed.models import adapters
from lit_embed.models.adapted import AdaptedEncoder, warn_query_route
from lit_embed.models.encoder import Encoder
from lit_embed.models.lora import LoRA, lora_config, save_lora
from lit_embed.models.model_folder import check_model_folder
from lit_embed.models.onnx_export import INT8_FILE, check_installed, copy_model, export_onnx
from lit_embed.models.reranker import Reranker, has_score_head
from lit_embed.models.saving import to_sentence_transformers
from lit_embed.training.checkpoint_io import load_checkpoint, load_encoder_weights

# A checkpoint's encoder loads with the trust_remote_code it was trained with; a model folder is exported only when it
# runs no code of its own.
NO_CODE_FIX = "export it with that code's own tools: lit-embed-export runs no code from a model folder"


def encoder_from_checkpoint(
    path: str | os.PathLike, checkpoint: dict | None = None
) -> Encoder | AdaptedEncoder | Reranker:
    """Rebuilds the trained encoder (full, adapter or LoRA) from a lit_embed checkpoint (``weights_only=True``);
    ``checkpoint``: its content, when already read."""
    checkpoint = load_checkpoint(path) if checkpoint is None else checkpoint
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
    elif config.get("reranker"):  # task=rerank: the cross-encoder, its fresh head (if any) then loaded
        encoder = Reranker(**{key: value for key, value in config.items() if key != "reranker"})
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
    parser.add_argument(
        "checkpoint",
        help="a .ckpt written during training, e.g. OUTPUT_DIR/checkpoints/last.ckpt; with --backend onnx also a "
        "sentence-transformers directory, e.g. OUTPUT_DIR/model",
    )
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
    parser.add_argument(
        "--backend",
        choices=["torch", "onnx"],
        default="torch",
        help="onnx: also write the transformer as OUTPUT_DIR/onnx/model.onnx (pip install 'lit_embed[onnx]')",
    )
    parser.add_argument(
        "--quantize", choices=["int8"], help=f"with --backend onnx: also an int8 copy, OUTPUT_DIR/onnx/{INT8_FILE}"
    )
    args = parser.parse_args(argv)
    quiet_third_party_output()
    with reported("lit-embed-export"):
        if args.quantize and args.backend != "onnx":
            raise LitEmbedError("--quantize int8 quantizes the ONNX export: add --backend onnx.")
        if args.backend == "onnx":
            check_installed()  # before any model is written
        if Path(args.checkpoint).is_dir():
            check_model_folder(args.checkpoint, what="folder", fix=NO_CODE_FIX)
            path = _copy_model_dir(args.checkpoint, args.output_dir, args.overwrite, args.backend)
        else:
            path = _export_checkpoint(args)
        if args.backend == "onnx":
            _report_onnx(path, export_onnx(path, args.quantize))
            return
    print(f"Wrote {path}; load it with SentenceTransformer({str(path)!r}).")


def _export_checkpoint(args: argparse.Namespace) -> Path:
    """The checkpoint's model in ``args.output_dir`` (with its card), LoRA's and LlamaIndex's adapter files beside."""
    checkpoint = load_checkpoint(args.checkpoint)
    encoder = encoder_from_checkpoint(args.checkpoint, checkpoint)
    output, lora_path = str(args.output_dir).rstrip("/"), None
    if lora_config(encoder) is None:
        path = to_sentence_transformers(encoder, args.output_dir, args.overwrite)
        llamaindex_dir = args.llamaindex_dir or f"{output}-llamaindex_adapter"
        if isinstance(encoder, AdaptedEncoder) and encoder.save_llamaindex_adapter(llamaindex_dir):
            print(f"Wrote the LlamaIndex adapter to {llamaindex_dir} (AdapterEmbeddingModel).")
            warn_query_route(encoder, path, llamaindex_dir)
    else:
        path, lora_path = save_lora(encoder, args.output_dir, args.lora_dir or f"{output}-lora", args.overwrite)
        print(f"Wrote the LoRA adapter alone to {lora_path} (PEFT: load_adapter onto the base model).")
    write_model_card(path, checkpoint_facts(args.checkpoint, checkpoint, path, lora_path))
    return path


def _copy_model_dir(source: str, output_dir: str, overwrite: bool, backend: str) -> Path:
    """A sentence-transformers directory copied to ``output_dir`` (``export_onnx`` then sets its ``tokenizer.json``)."""
    source_path, target = Path(source), Path(output_dir)
    if backend != "onnx":
        raise LitEmbedError(
            f"{source} is a directory, and without --backend onnx there is nothing to export from it: it already is "
            "a model. Give a checkpoint (.ckpt), or add --backend onnx."
        )
    if not (source_path / "modules.json").is_file():
        raise LitEmbedError(f"{source} is neither a checkpoint nor a sentence-transformers directory (no modules.json)")
    if target.resolve() == source_path.resolve():
        raise LitEmbedError(f"{output_dir} is the model directory itself: choose another output directory.")
    if target.exists() and not overwrite:
        raise LitEmbedError(f"{target} already holds a model. Choose another output directory or add --overwrite.")

    return write_directory_atomic(target, lambda staging: copy_model(source_path, staging))


def _report_onnx(path: Path, files: list[Path]) -> None:
    names = ", ".join(str(f.relative_to(path)) for f in files)
    kinds = [str(m["type"]).rpartition(".")[2] for m in json.loads((path / "modules.json").read_text())]
    print(f"Wrote {path} with {names}.")
    if has_score_head(path):
        print(
            f"Load it with CrossEncoder({str(path)!r}, backend='onnx') (needs optimum-onnx), or run onnx/model.onnx "
            "with onnxruntime on the tokenizer's pair features: its output 'logits' is the score."
        )
        return
    print(
        f"Load it with SentenceTransformer({str(path)!r}, backend='onnx') (needs optimum-onnx; "
        "model_kwargs={'file_name': 'onnx/<file>'} picks a file), or embed without torch with "
        f"lit_embed.models.onnx_export.OnnxEmbedder({str(path)!r})."
    )
    others = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
    if others:
        print(
            f"Only the transformer is in the ONNX file; the model's {', '.join(others)} module(s) run in "
            "sentence-transformers (backend='onnx' runs them in torch). A runtime without sentence-transformers "
            "must apply them itself: their weights are in the model directory's module folders."
        )


if __name__ == "__main__":
    main()
