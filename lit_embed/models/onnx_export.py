"""ONNX (and int8) copies of a sentence-transformers model's transformer, and embedding with them without torch.

* :func:`export_onnx`: writes ``onnx/model.onnx`` (and ``onnx/model_qint8_quantized.onnx``) into a
  sentence-transformers directory, laid out as sentence-transformers' ONNX backend loads it
  (``SentenceTransformer(path, backend="onnx")``, with optimum-onnx installed).
* :class:`OnnxEmbedder`: texts -> embeddings with onnxruntime, the ``tokenizers`` library and numpy alone, reading
  the directory's ``tokenizer.json``, prompts, pooling and normalization as an inference server would.

As in sentence-transformers' ONNX backend, only the transformer runs in onnxruntime: its input is the tokenizer's
output (``input_ids``, ``attention_mask``, ``token_type_ids`` when the tokenizer gives them), its output the token
embeddings, ``last_hidden_state``. Pooling, normalization and any ``Dense`` or ``Router`` module after it stay
sentence-transformers modules. The export runs ``torch.onnx.export`` (the torch.export-based exporter, which needs
onnxscript) and quantizes with onnxruntime's ``quantize_dynamic``, not optimum: optimum-onnx pins transformers
below 4.58, so it cannot be installed next to this package's transformers 5.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lit_embed.errors import LitEmbedError
from lit_embed.models.prompts import prompt_for, saved_prompts

INSTALL = 'pip install "lit_embed[onnx]"'
ONNX_DIR = "onnx"
MODEL_FILE = "model.onnx"
# sentence-transformers' name for an int8 file made with a custom quantization config ("<weights>_quantized").
INT8_FILE = "model_qint8_quantized.onnx"
OUTPUT = "last_hidden_state"
RERANKER_OUTPUT = "logits"  # a reranker's export: its score, as sentence-transformers' CrossEncoder ONNX files name it
TOLERANCE = 1e-3  # largest difference from torch in any token embedding that the export accepts
POOLING_MODES = ("mean", "cls", "max", "lasttoken")  # what OnnxEmbedder pools with, as sentence-transformers
LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def missing_packages() -> list[str]:
    """The packages the ONNX export needs that are not installed."""
    return [name for name in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(name) is None]


def check_installed() -> None:
    """Raises one :class:`LitEmbedError` naming the extra when onnx, onnxruntime or onnxscript is missing."""
    missing = missing_packages()
    if missing:
        raise LitEmbedError(f"the ONNX export needs {', '.join(missing)}, which is not installed: {INSTALL}.")


def export_onnx(model_dir: str | os.PathLike, quantize: Literal["int8"] | None = None) -> list[Path]:
    """Writes the transformer of the sentence-transformers directory ``model_dir`` as ONNX into ``model_dir/onnx``.

    ``onnx/model.onnx`` holds fp32 weights and computes what torch computes (checked here, to ``1e-3`` in every
    token embedding, before anything is written); ``quantize="int8"`` adds ``onnx/model_qint8_quantized.onnx``,
    with int8 weights in every matrix product (dynamic quantization: activations are quantized per batch).
    The ``onnx`` folder is replaced as a whole, and ``tokenizer.json`` is set to cut and pad as sentence-transformers
    does with this model (a hub download's file often cuts elsewhere), since runtimes read it alone. Returns the
    files written.
    """
    check_installed()
    if quantize not in (None, "int8"):
        raise LitEmbedError(f"quantize={quantize!r} is not allowed: int8, or none for fp32 only.")
    from lit_embed.files import write_directory_atomic
    from lit_embed.models.encoder import Encoder
    from lit_embed.models.reranker import Reranker, has_score_head
    from lit_embed.models.saving import match_tokenizer_file

    model_dir = Path(model_dir)
    if not (model_dir / "modules.json").is_file():
        raise LitEmbedError(
            f"{model_dir} is not a sentence-transformers directory (it has no modules.json). Give a model folder "
            "such as a run's model/, or a checkpoint to lit-embed-export."
        )
    # fp32 whatever the weights were saved in: onnxruntime's CPU kernels have no bf16 matrix products.
    output = OUTPUT
    if has_score_head(model_dir):  # a reranker: the model with its score head, (query, document) pairs in, logits out
        encoder: Any = Reranker(str(model_dir), dtype="float32").eval()
        transformer = encoder.hf_model
        features = encoder.model.preprocess([("an example query to trace", "the model's document"), ("a", "b")])
        output = RERANKER_OUTPUT
    else:
        encoder = Encoder(str(model_dir), dtype="float32").eval()
        transformer = getattr(encoder.model[0], "auto_model", None)
        if transformer is None:
            raise LitEmbedError(
                f"{model_dir} starts with a {type(encoder.model[0]).__name__}, not a Hugging Face transformer: only a "
                "transformer can be exported to ONNX here."
            )
        features = encoder.tokenize(["an example text to trace the model", "a short one"], "document")
    names = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in features]
    inputs = {name: features[name] for name in names}

    def write(staging: Path) -> None:
        _export(transformer, inputs, staging / MODEL_FILE, output)
        _check_against_torch(transformer, staging / MODEL_FILE, model_dir, output)
        if quantize == "int8":
            _quantize(staging / MODEL_FILE, staging / INT8_FILE)

    write_directory_atomic(model_dir / ONNX_DIR, write)
    match_tokenizer_file(model_dir, encoder.tokenizer)
    return sorted((model_dir / ONNX_DIR).glob("*.onnx"))


def _token_embeddings(transformer: Any, output: str = OUTPUT) -> Any:
    """The transformer with keyword inputs and ``output`` (the token embeddings, or a reranker's logits) as its only
    output, as ONNX sees it."""
    import torch

    class TokenEmbeddings(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            return self.transformer(input_ids=input_ids, attention_mask=attention_mask, **extra)[output]

    return TokenEmbeddings().eval()


def _export(transformer: Any, inputs: dict[str, Any], path: Path, output: str = OUTPUT) -> None:
    import torch

    batch, length = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
    try:
        # The exporter warns about its own internals (tree specs, axis renaming), nothing a user can act on.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _token_embeddings(transformer, output),
                (),
                str(path),
                kwargs=inputs,
                input_names=list(inputs),
                output_names=[output],
                dynamic_shapes={name: {0: batch, 1: length} for name in inputs},
                dynamo=True,
                verbose=False,
                # One file up to protobuf's 2 GB; the weights of a bigger model go next to it (model.onnx.data).
                external_data=sum(p.numel() * 4 for p in transformer.parameters()) > 1_900_000_000,
            )
    except Exception as err:  # the exporter raises many types; the first line says what it could not trace
        name = type(transformer).__name__
        raise LitEmbedError(
            f"torch.onnx.export could not export {name}: {str(err).strip().splitlines()[0]}. Only the transformer "
            "is exported; an architecture torch.export cannot trace needs its own export."
        ) from err


def _check_against_torch(transformer: Any, path: Path, model_dir: Path, output: str = OUTPUT) -> None:
    """Runs the ONNX file on new inputs of other shapes than the traced ones and compares ``output`` with torch."""
    import onnxruntime as ort
    import torch

    generator = torch.Generator().manual_seed(0)
    # Lengths 1 and 7 and a batch of 3 (traced with 2), one text padded on each side.
    for length in (1, 7):
        ids = torch.randint(100, 1000, (3, length), generator=generator)
        mask = torch.ones_like(ids)
        if length > 2:
            mask[1, -2:] = 0
            mask[2, :2] = 0
        inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        (got,) = session.run([output], {name: inputs[name].numpy() for name in names})
        with torch.no_grad():
            want = transformer(**{name: inputs[name] for name in names})[output].float().numpy()
        real = mask.numpy().astype(bool) if output == OUTPUT else np.ones(want.shape, dtype=bool)  # logits: [n, 1]
        error = float(np.abs(got - want)[real].max())
        if not error <= TOLERANCE:
            raise LitEmbedError(
                f"the ONNX export of {model_dir} differs from the torch model by {error:.3g} in its {output} "
                f"(inputs of length {length}), more than {TOLERANCE}: nothing was written. Use the torch model."
            )


def _quantize(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # int8 weights with one scale per output channel and no reduced range, uint8 activations quantized per batch,
    # as optimum's avx512_vnni config; unlike its default, only the matrix products (optimum also quantizes the
    # embedding lookups, Gather). onnxruntime logs a suggestion to pre-process the model first, to the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            source,
            target,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=False,
            op_types_to_quantize=["MatMul", "Gemm"],
            use_external_data_format=source.stat().st_size > 1_900_000_000,  # past protobuf's 2 GB
        )
    finally:
        root.setLevel(level)


class OnnxEmbedder:
    """Embeds texts with an exported model: onnxruntime, the ``tokenizers`` library and numpy, no torch.

    What an inference server does with the directory: ``tokenizer.json`` tokenizes (its truncation and padding are
    training's), the ONNX file gives the token embeddings, then the pooling in ``1_Pooling/config.json`` and the
    ``Normalize`` module if ``modules.json`` lists one. A directory with other modules (an adapter's ``Dense`` or
    ``Router``) is refused: those run in sentence-transformers (``backend="onnx"``), not here.

    Args:
        model_dir: a sentence-transformers directory with an ``onnx`` folder (:func:`export_onnx`).
        file_name: the ONNX file in ``model_dir/onnx``: ``model.onnx`` or ``model_qint8_quantized.onnx``.
        threads: onnxruntime's intra-op threads (None: its default, every core).
    """

    def __init__(self, model_dir: str | os.PathLike, file_name: str = MODEL_FILE, threads: int | None = None) -> None:
        check_installed()
        import onnxruntime as ort
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        onnx_file = model_dir / ONNX_DIR / file_name
        if not onnx_file.is_file():
            raise LitEmbedError(f"{onnx_file} does not exist: export it first (lit-embed-export ... --backend onnx).")
        modules = json.loads((model_dir / "modules.json").read_text(encoding="utf-8"))
        kinds = [str(m["type"]).rpartition(".")[2] for m in modules]
        if kinds[:2] != ["Transformer", "Pooling"] or any(k != "Normalize" for k in kinds[2:]):
            raise LitEmbedError(
                f"{model_dir} has the modules {kinds}; without sentence-transformers only Transformer, Pooling and "
                "Normalize can be run. Load it with SentenceTransformer(path, backend='onnx'), which runs the "
                "transformer in onnxruntime and the other modules in torch."
            )
        self.pooling = _pooling_modes(model_dir / modules[1]["path"] / "config.json")
        self.normalize = "Normalize" in kinds
        self.tokenizer = Tokenizer.from_file(str(model_dir / modules[0].get("path", "") / "tokenizer.json"))
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.prompts = saved_prompts(model_dir)

    def prompt(self, kind: str) -> str:
        """The prompt ``encode_query`` / ``encode_document`` would put before a text of this kind."""
        return prompt_for(self.prompts, kind)

    def encode(self, texts: Sequence[str], kind: str = "document", batch_size: int = 32) -> np.ndarray:
        """``[len(texts), D]`` float32 embeddings, ``kind`` (``"query"`` or ``"document"``) choosing the prompt."""
        prompt = self.prompt(kind)
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer.encode_batch([prompt + t for t in texts[start : start + batch_size]])
            features = {
                "input_ids": np.array([e.ids for e in batch], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in batch], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in batch], dtype=np.int64),
            }
            (tokens,) = self.session.run([OUTPUT], {name: features[name] for name in self.input_names})
            chunks.append(pool(tokens, features["attention_mask"], self.pooling))
        embeddings = np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)
        if self.normalize:
            embeddings = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
        return embeddings.astype(np.float32)


def pool(tokens: np.ndarray, mask: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """``[B, L, D]`` token embeddings -> ``[B, D * len(modes)]``, as sentence-transformers' ``Pooling``."""
    real = mask[..., None].astype(tokens.dtype)  # [B, L, 1]
    rows = np.arange(len(tokens))
    first = np.argmax(mask, axis=1)  # [B] first real position, whichever side the padding is on
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)  # [B] last real position
    pooled = {
        "mean": lambda: (tokens * real).sum(1) / np.maximum(real.sum(1), 1e-9),
        "max": lambda: np.where(real > 0, tokens, -np.inf).max(1),
        "cls": lambda: tokens[rows, first],
        "lasttoken": lambda: tokens[rows, last],
    }
    return np.concatenate([pooled[mode]() for mode in modes], axis=1)


def _pooling_modes(config_file: Path) -> list[str]:
    """The pooling modes of a ``Pooling`` config, in sentence-transformers 6's format or the older one."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in LEGACY_POOLING_KEYS.items() if config.get(key)] or ["mean"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if any(mode not in POOLING_MODES for mode in modes) or config.get("include_prompt") is False:
        raise LitEmbedError(
            f"{config_file}: OnnxEmbedder pools with {', '.join(POOLING_MODES)}, prompt tokens included; this "
            f"pooling ({modes}) needs sentence-transformers: SentenceTransformer(path, backend='onnx')."
        )
    return modes


def copy_model(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copies a sentence-transformers directory without a previous export's ``onnx`` folder."""
    shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(ONNX_DIR))
