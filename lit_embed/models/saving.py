"""Writing trained models where other tools load them, without lit_embed.

* :func:`to_sentence_transformers`: any encoder as a sentence-transformers directory, swapped in atomically.
* :func:`match_tokenizer_file`: a directory's ``tokenizer.json`` set to truncate and pad as the model was trained.
* :func:`dense_modules`: an adapter head as plain sentence-transformers ``Dense`` modules.
* :func:`save_llamaindex_adapter`: an adapter head as LlamaIndex's ``AdapterEmbeddingModel`` reads it.
* :func:`save_head`: an adapter head alone (safetensors), for vectors computed elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lit_embed.errors import LitEmbedError
from lit_embed.files import write_directory_atomic
from lit_embed.models.adapters import LinearAdapter, MLPAdapter
from lit_embed.models.encoder import weights_are_finite


class SavableEncoder(Protocol):
    def save(self, path: str | os.PathLike) -> None: ...

    def parameters(self) -> Any: ...


def to_sentence_transformers(encoder: SavableEncoder, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Saves ``encoder`` as a sentence-transformers directory that ``SentenceTransformer(path)`` loads as is.

    The directory is written next to its destination and renamed into place, so a crash mid-save never
    leaves a half-written model where a good one was.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise LitEmbedError(f"{path} already holds a model. Choose another output directory or set overwrite=true.")
    if not weights_are_finite(encoder):
        raise LitEmbedError(f"refusing to write {path}: the model's weights contain NaN or inf values.")

    tokenizer = getattr(encoder, "tokenizer", None)  # None: vectors from elsewhere, no text model

    def write(staging: Path) -> None:
        encoder.save(staging)
        if tokenizer is not None:
            match_tokenizer_file(staging, tokenizer)

    try:
        return write_directory_atomic(path, write)
    except OSError as err:
        raise LitEmbedError(
            f"could not write the model to {path}: {err.strerror or err}. Nothing was replaced; the checkpoints are "
            "intact. Free disk space or fix permissions, then run again with resume=true."
        ) from err


def match_tokenizer_file(model_dir: str | os.PathLike, tokenizer: Any) -> None:
    """Writes ``tokenizer`` (the one training used) as ``model_dir``'s ``tokenizer.json``, set to cut and pad as it did.

    Servers that read ``tokenizer.json`` with the ``tokenizers`` library alone (ONNX runtimes, Rust and JS
    embedders) apply the truncation and padding stored in it, while sentence-transformers sets its own per call.
    ``transformers`` writes back whatever the file held when the base model was downloaded (all-MiniLM-L6-v2's:
    cut at 128 tokens and every text padded to 128), or no limit at all. The file written here cuts at the
    tokenizer's ``model_max_length`` (sentence-transformers' ``max_seq_length``) on its truncation side, and pads a
    batch to its longest text on its padding side, with its padding token; everything else (normalizer, special
    tokens) is the tokenizer as training ran it.
    """
    from tokenizers import Tokenizer

    folder = _transformer_folder(Path(model_dir))
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    max_length = tokenizer.model_max_length
    if max_length < NO_LIMIT:
        backend.enable_truncation(max_length, strategy="longest_first", direction=tokenizer.truncation_side)
    else:  # as sentence-transformers, which then cuts nothing
        backend.no_truncation()
    if tokenizer.pad_token_id is None:  # without a padding token, batches of one text only, as in transformers
        backend.no_padding()
    else:
        backend.enable_padding(
            direction=tokenizer.padding_side,
            pad_id=tokenizer.pad_token_id,
            pad_token=tokenizer.pad_token,
            pad_type_id=tokenizer.pad_token_type_id,
        )
    backend.save(str(folder / "tokenizer.json"))
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    if config.get("max_length") not in (None, max_length) and max_length < NO_LIMIT:
        # transformers copies the downloaded file's limit here too; keep it equal to the one that applies
        config["max_length"] = max_length
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# transformers' model_max_length when a tokenizer sets none (VERY_LARGE_INTEGER, 1e30).
NO_LIMIT = int(1e29)


def _transformer_folder(model_dir: Path) -> Path:
    """The folder of the first ``Transformer`` module that ``modules.json`` lists (else the directory itself)."""
    modules_file = model_dir / "modules.json"
    modules = json.loads(modules_file.read_text(encoding="utf-8")) if modules_file.is_file() else []
    paths = [m.get("path", "") for m in modules if str(m.get("type", "")).endswith("Transformer")]
    return model_dir / (paths[0] if paths else "")


def save_llamaindex_adapter(adapter: LinearAdapter | MLPAdapter, path: str | os.PathLike) -> None:
    """Writes ``config.json`` + ``pytorch_model.bin`` as LlamaIndex's ``LinearLayer`` / ``TwoLayerNN`` save them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(adapter.llamaindex_config()))
    state = {k: v.detach().cpu().clone() for k, v in adapter.state_dict().items()}
    torch.save(state, path / "pytorch_model.bin")  # LlamaIndex's file name; tensors only


def save_head(adapter: nn.Module, config: dict[str, Any], path: str | os.PathLike) -> None:
    """The head alone: ``adapter.safetensors`` and its ``adapter_config.json``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}
    save_file(weights, str(path / "adapter.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))


def dense_modules(adapter: LinearAdapter | MLPAdapter) -> list[nn.Module]:
    """The adapter as sentence-transformers ``Dense`` modules, which load without lit_embed.

    The MLP's residual ``x + r W2 relu(W1 x + b1) + b2`` has no ``Dense`` of its own; it is written exactly as
    ``relu([W1; I; -I] x + [b1; 0; 0])`` followed by ``[r W2, I, -I]``, using ``relu(x) - relu(-x) = x``.
    """
    from sentence_transformers.base.modules import Dense

    identity = nn.Identity()
    with torch.no_grad():
        if isinstance(adapter, LinearAdapter):
            lin = adapter.linear
            return [Dense(adapter.in_dim, adapter.out_dim, adapter.bias, identity, lin.weight.clone(), _bias(lin))]
        w1, b1 = adapter.linear1.weight, adapter.linear1.bias
        w2, b2 = adapter.linear2.weight, adapter.linear2.bias
        if not adapter.residual:
            act = {"relu": nn.ReLU(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(), "leaky_relu": nn.LeakyReLU()}
            hidden = Dense(adapter.in_dim, adapter.hidden_dim, True, act[adapter.activation], w1.clone(), b1.clone())
            return [hidden, Dense(adapter.hidden_dim, adapter.out_dim, True, identity, w2.clone(), b2.clone())]
        if adapter.activation != "relu":
            raise LitEmbedError(
                "a residual MLPAdapter can be written as plain sentence-transformers modules only with "
                "activation=relu; train with adapter.activation=relu or adapter.residual=false."
            )
        eye = torch.eye(adapter.in_dim)
        zeros = torch.zeros(adapter.in_dim)
        r = adapter.residual_weight
        first = Dense(
            adapter.in_dim,
            adapter.hidden_dim + 2 * adapter.in_dim,
            True,
            nn.ReLU(),
            torch.cat([w1, eye, -eye]),
            torch.cat([b1, zeros, zeros]),
        )
        second = Dense(
            adapter.hidden_dim + 2 * adapter.in_dim,
            adapter.out_dim,
            True,
            identity,
            torch.cat([r * w2, eye, -eye], dim=1),
            r * b2,
        )
        return [first, second]


def _bias(linear: nn.Linear) -> Tensor | None:
    return linear.bias.clone() if linear.bias is not None else None
