"""The encoder: a sentence-transformers model plus the query/document prompts it is trained and used with."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
from sentence_transformers import SentenceTransformer
from torch import Tensor, nn

from lit_embed.batch import Features, PackedTexts, padding_groups
from lit_embed.errors import check, is_bool, is_int
from lit_embed.internals import attention_implementation, dynamo_recompile_limit, set_attention_implementation
from lit_embed.models.model_folder import check_model_folder, loading_errors
from lit_embed.models.packed import PACKED_BUCKET, POOLING_MODES, attend_all, install_packed_attention, pool
from lit_embed.models.prompts import prompt_for

log = logging.getLogger(__name__)

TextKind = Literal["query", "document"]
# Length groups for packed texts that an encoder that cannot pack gets without a setting of their own.
DEFAULT_LENGTH_GROUPS = 4
# Recompiles a compiled transformer may take per code object (see lit_embed.internals.dynamo_recompile_limit).
RECOMPILE_LIMIT = 64
# model.dtype: the names torch and Lightning use for each.
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class Encoder(nn.Module):
    """Texts -> embeddings with any sentence-transformers model, keeping the pooling it was saved with.

    Args:
        model_name_or_path: a sentence-transformers directory or hub id (a plain Hugging Face model gets
            mean pooling, as in sentence-transformers).
        max_seq_length: truncate inputs to this many tokens (None keeps the model's setting).
        query_prompt: text put before every query, e.g. bge's
            ``"Represent this sentence for searching relevant passages: "``. None keeps the model's saved prompt.
        document_prompt: text put before every document. None keeps the model's saved prompt.
        trust_remote_code: allow the model directory to run code from outside sentence-transformers: module
            classes its ``modules.json`` names, custom activations, Hugging Face custom models. Off unless you
            trust it; a directory that needs it is refused with a message naming the file and the class.
        model_kwargs: passed to ``transformers``' ``from_pretrained`` (e.g. ``{"attn_implementation": "sdpa"}``).
        dtype: load the transformer's weights in ``bfloat16``, ``float16`` or ``float32`` (``bf16``, ``fp16``,
            ``fp32``); None keeps ``transformers``' default (the dtype the weights were saved in). Half-precision
            weights halve their memory; they suit a frozen base (``method=lora``) or inference, while full
            finetuning keeps fp32 weights and gets bf16 compute from ``trainer.precision=bf16-mixed``.
        load_in_4bit: load the transformer's linear weights as 4-bit NF4 (``bitsandbytes``, QLoRA's base):
            a quarter of bf16's memory, frozen, for adapter training (``method=lora``). Needs a CUDA GPU and
            ``pip install bitsandbytes``; refused with a message anywhere else. Computes in ``dtype`` (bf16 if None).
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike,
        max_seq_length: int | None = None,
        query_prompt: str | None = None,
        document_prompt: str | None = None,
        trust_remote_code: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        dtype: str | None = None,
        load_in_4bit: bool = False,
    ) -> None:
        super().__init__()
        check(
            max_seq_length is None or is_int(max_seq_length) and max_seq_length >= 1,
            "max_seq_length",
            max_seq_length,
            "a whole number of tokens >= 1, or null for the model's own limit",
        )
        switches = {
            "trust_remote_code": trust_remote_code,
            "load_in_4bit": load_in_4bit,
        }
        for key, value in switches.items():
            check(is_bool(value), key, value, "true or false")
        for key, value in (("query_prompt", query_prompt), ("document_prompt", document_prompt)):
            check(value is None or isinstance(value, str), key, value, "a text (quote it), or null for the model's own")
        path = str(model_name_or_path)
        # Enough to rebuild this encoder around a checkpoint's weights (see lit_embed.export).
        self.config = {
            "model_name_or_path": path,
            "max_seq_length": max_seq_length,
            "query_prompt": query_prompt,
            "document_prompt": document_prompt,
            "trust_remote_code": trust_remote_code,
            "model_kwargs": dict(model_kwargs or {}),
            "dtype": dtype,
            "load_in_4bit": load_in_4bit,
        }
        loading = _loading_kwargs(dict(model_kwargs or {}), dtype, load_in_4bit)
        check_model_folder(path, trust_remote_code)
        with loading_errors(path):
            self.model = SentenceTransformer(
                path,
                # 4-bit weights are quantized onto the GPU as they load (device_map); keep them there.
                device="cuda" if load_in_4bit else "cpu",
                trust_remote_code=trust_remote_code,
                model_kwargs=loading,
            )
        if max_seq_length is not None:
            check_position_limit(getattr(self.model[0], "auto_model", None), max_seq_length)
            self.model.max_seq_length = max_seq_length
        tokenizer = self.model.tokenizer
        if getattr(tokenizer, "pad_token", "") is None and getattr(tokenizer, "eos_token", None) is not None:
            # Many causal LM tokenizers (Llama's, Mistral's) have no padding token, and without one no batch of
            # texts can be tokenized, here or in encode(). The padding is masked out, so the EOS serves; the export
            # keeps it, so the finetuned model embeds batches in plain sentence-transformers too.
            tokenizer.pad_token = tokenizer.eos_token
            log.info("%s's tokenizer has no padding token: padding with its EOS token %r.", path, tokenizer.eos_token)
        if query_prompt is not None:
            self.model.prompts["query"] = query_prompt
        if document_prompt is not None:
            self.model.prompts["document"] = document_prompt
        # A compiled transformer gets packed rows padded to a bucket of lengths (None: rows as they are).
        self.packed_bucket: int | None = None
        # sentence-transformers loads models in eval mode; training needs dropout on (encode() switches it off).
        self.train()

    def compile_transformer(self) -> None:
        """``torch.compile`` the Hugging Face model, in place so the weights keep their names in checkpoints and
        exports (dynamic shapes: length groups and packed rows of any length do not recompile). Fewer, fused kernels
        for launch-bound small encoders on a GPU; the first steps pay the compilation. Packed rows are then padded to
        a multiple of :data:`PACKED_BUCKET` tokens, and their attention runs outside the compiled graph."""
        self.packed_bucket = PACKED_BUCKET
        getattr(self.model[0], "auto_model", self.model[0]).compile(dynamic=True)

    def enable_gradient_checkpointing(self) -> None:
        """Keep only each layer's inputs in the forward pass and recompute its activations in backward: activation
        memory of about one layer instead of all of them, for about a third more compute; the loss and gradients are
        unchanged, packed or padded."""
        recompute_activations(getattr(self.model[0], "auto_model", None) or self.model[0])

    @property
    def embedding_dim(self) -> int:
        return self.model.get_embedding_dimension()

    @property
    def pad_token_id(self) -> int:
        return self.model.tokenizer.pad_token_id or 0

    @property
    def max_seq_length(self) -> int:
        return self.model.max_seq_length

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer that training and ``encode`` use (the export writes it as ``tokenizer.json``)."""
        return self.model.tokenizer

    @property
    def vocab_size(self) -> int:
        """Token ids are below this (the data stores them in the smallest integer type that holds it)."""
        return len(self.model.tokenizer)

    @property
    def padding_side(self) -> str:
        """Where the tokenizer pads (``"left"`` for most decoder embedders): training batches are padded there too."""
        return getattr(self.model.tokenizer, "padding_side", None) or "right"

    def prompt(self, kind: TextKind) -> str:
        """The prompt that ``encode_query`` / ``encode_document`` would use, so training matches inference."""
        return prompt_for(self.model.prompts, kind)

    def tokenize(self, texts: Sequence[str], kind: TextKind) -> dict[str, Any]:
        """Prompted, truncated, padded features for a list of texts."""
        features = self.model.preprocess(list(texts), prompt=self.prompt(kind) or None)
        # As encode_query/encode_document do: a model with a Router (an exported adapter) routes on the task.
        features["task"] = kind
        return features

    def forward(self, texts: PackedTexts) -> Tensor:
        """Packed texts -> ``[n, D]`` embeddings: attended within each text where this encoder packs
        (:attr:`packing_unsupported`) and ``texts.length_groups`` asks for it, else padded in length groups."""
        if self.packs(texts):
            return self._forward_packed(texts)
        # Padded as inference pads (encode_query/encode_document): a model whose output depends on where the padding
        # is (one that reads the last position) trains on what it is used with. Shortest texts first, in groups.
        rows = sorted(range(len(texts)), key=texts.lengths.__getitem__)
        bounds = padding_groups([texts.lengths[i] for i in rows], texts.length_groups or DEFAULT_LENGTH_GROUPS)
        groups = [texts.padded(rows[start:end], self.padding_side, self.pad_token_id) for start, end in bounds]
        embeddings = torch.cat([self.embed_features(features) for features in groups])  # [n, D], shortest first
        return embeddings[torch.argsort(torch.tensor(rows, device=embeddings.device))]  # [n, D] in the texts' order

    def packs(self, texts: PackedTexts) -> bool:
        """Whether :meth:`forward` attends within each text (else it pads them)."""
        return texts.length_groups == 0 and self.packing_unsupported is None

    def embed_features(self, features: Features) -> Tensor:
        """Padded features from :meth:`tokenize` -> ``[n, D]`` embeddings, as sentence-transformers computes them."""
        with self._compiled_calls():
            return self.model(dict(features))["sentence_embedding"]

    def _forward_packed(self, packed: PackedTexts) -> Tensor:
        transformer, pooling, *after = list(self.model)
        bucket = self.packed_bucket
        attended = packed.padded_to_multiple(bucket, self.pad_token_id) if bucket else packed
        with self._compiled_calls():
            tokens = transformer.auto_model(
                input_ids=attended.input_ids,
                position_ids=attended.position_ids,
                attention_mask=attend_all(attended.input_ids.device),
                packed=attended,
            )
        tokens = tokens.last_hidden_state[0, : packed.input_ids.size(1)]  # [T, H], without the padding text
        skip = 0 if pooling.include_prompt else packed.extras.get("prompt_length") or 0
        features = {"sentence_embedding": pool(tokens, packed, pooling.pooling_mode, skip)}  # [n, H]
        for module in after:  # Dense, Normalize, ...: they work on the pooled embeddings
            features = module(features)
        return features["sentence_embedding"]

    def _compiled_calls(self) -> contextlib.AbstractContextManager:
        return dynamo_recompile_limit(RECOMPILE_LIMIT) if self.packed_bucket else contextlib.nullcontext()

    @functools.cached_property
    def packing_unsupported(self) -> str | None:
        """Why this encoder cannot embed packed texts (None: it can, with the same embeddings as padded batches).

        It needs a Hugging Face transformer, then a Pooling module of one of :data:`POOLING_MODES`, and an attention
        that :func:`~lit_embed.models.packed.install_packed_attention` can install; and its packed embeddings of a
        few probe texts must equal its padded ones (which rules out architectures whose attention does not go
        through transformers' attention functions, and position schemes that packing would change). Where it can,
        the packed attention stays installed from here on.
        """
        modules = list(self.model)
        transformer = getattr(modules[0], "auto_model", None)
        if transformer is None or not hasattr(transformer, "config"):
            return f"its first module is a {type(modules[0]).__name__}, not a Hugging Face transformer"
        pooling = modules[1] if len(modules) > 1 else None
        mode = getattr(pooling, "pooling_mode", None)
        if type(pooling).__name__ != "Pooling" or mode not in POOLING_MODES:
            return f"its pooling ({type(pooling).__name__} {mode or ''}) is not one of {', '.join(POOLING_MODES)}"
        probes = ["A probe text.", "A longer probe text, with more words in it than the first one has.", "x"]
        features = self.tokenize(probes, "document")
        if set(features) - {"input_ids", "attention_mask", "token_type_ids", "task", "prompt_length", "modality"}:
            return f"its tokenizer gives features packing does not carry ({', '.join(sorted(features))})"
        if "token_type_ids" in features and features["token_type_ids"].any():
            return "its tokenizer gives type ids other than 0"
        own = attention_implementation(transformer.config)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                device = self.device
                features = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in features.items()}
                padded = self.embed_features(features)
                if reason := install_packed_attention(transformer):
                    return reason
                unpadded = self._forward_packed(PackedTexts.from_features(features))
                padded_after = self.embed_features(features)
        except Exception as err:  # an architecture that cannot take packed inputs at all
            set_attention_implementation(transformer.config, own)
            return f"it cannot run packed inputs ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        finally:
            self.train(was_training)
        if not (close(unpadded, padded) and torch.equal(padded_after, padded)):
            set_attention_implementation(transformer.config, own)
            return "its packed embeddings differ from its padded ones (its attention or positions do not pack)"
        return None

    @torch.no_grad()
    def encode(self, texts: Sequence[str], kind: TextKind, batch_size: int = 64) -> Tensor:
        """Embeds texts for evaluation: no grad, eval mode, longest texts first so padding stays small.

        Returns ``[len(texts), D]`` float32 embeddings on the model's device, in the input order.
        """
        was_training = self.training
        self.eval()
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        chunks = []
        try:
            for start in range(0, len(order), batch_size):
                features = self.tokenize([texts[i] for i in order[start : start + batch_size]], kind)
                features = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in features.items()}
                chunks.append(self.embed_features(features).float())
        finally:
            self.train(was_training)
        embeddings = torch.cat(chunks) if chunks else torch.empty(0, self.embedding_dim, device=self.device)
        return embeddings[torch.argsort(torch.tensor(order, device=embeddings.device))]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def save(self, path: str | os.PathLike) -> None:
        """Writes a sentence-transformers directory (safetensors weights, prompts included)."""
        self.model.save(str(path), safe_serialization=True)


def recompute_activations(transformer: nn.Module) -> None:
    """Turns on gradient checkpointing in a Hugging Face model, or says why it cannot."""
    check(
        bool(getattr(transformer, "supports_gradient_checkpointing", False)),
        "gradient_checkpointing",
        True,
        f"false for this model: its {type(transformer).__name__} cannot recompute activations",
    )
    # transformers 5.2x renamed the method; the older name still works there, with a deprecation warning.
    enable = getattr(transformer, "activation_checkpointing_enable", None) or transformer.gradient_checkpointing_enable
    # Non-reentrant: correct when no input needs a gradient (frozen embeddings under LoRA) and with keyword
    # arguments; the RNG is replayed, so dropout draws the same masks when a layer is recomputed.
    enable({"use_reentrant": False})


def check_position_limit(transformer: nn.Module | None, max_seq_length: int) -> None:
    """Refuses a length longer than the model's position embeddings cover (it would fail mid-training)."""
    limit = getattr(getattr(transformer, "config", None), "max_position_embeddings", None)
    check(
        limit is None or max_seq_length <= limit,
        "max_seq_length",
        max_seq_length,
        f"at most {limit} tokens, the longest input this model's position embeddings cover",
    )


def _loading_kwargs(model_kwargs: dict[str, Any], dtype: str | None, load_in_4bit: bool) -> dict[str, Any]:
    """``transformers``' ``from_pretrained`` arguments for ``model.dtype`` and ``model.load_in_4bit``."""
    check(
        dtype is None or isinstance(dtype, str) and dtype in DTYPES,
        "dtype",
        dtype,
        "bfloat16, float16 or float32 (or bf16, fp16, fp32), or null for the dtype the weights were saved in",
    )
    given = [key for key in ("dtype", "torch_dtype") if key in model_kwargs]
    check(
        dtype is None or not given,
        "dtype",
        dtype,
        f"null while model.model_kwargs sets {' and '.join(given)}: set the dtype in one place",
    )
    if dtype is not None:
        model_kwargs["dtype"] = DTYPES[dtype]
    if not load_in_4bit:
        return model_kwargs
    check(
        "quantization_config" not in model_kwargs,
        "load_in_4bit",
        load_in_4bit,
        "false while model.model_kwargs sets a quantization_config: quantize in one place",
    )
    missing = [
        need
        for need, ok in (
            ("a CUDA GPU (none is visible)", torch.cuda.is_available()),
            ("bitsandbytes (pip install bitsandbytes)", importlib.util.find_spec("bitsandbytes") is not None),
        )
        if not ok
    ]
    check(
        not missing,
        "load_in_4bit",
        load_in_4bit,
        f"false here: 4-bit weights need {' and '.join(missing)}. Run on a CUDA machine with bitsandbytes "
        "installed, or set model.load_in_4bit=false (model.dtype=bfloat16 halves the weights' memory on any device)",
    )
    from transformers import BitsAndBytesConfig

    compute = DTYPES[dtype] if dtype is not None else torch.bfloat16
    model_kwargs["quantization_config"] = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    model_kwargs.setdefault("device_map", {"": torch.cuda.current_device()})
    return model_kwargs


def close(a: Tensor, b: Tensor) -> bool:
    """Equal embeddings up to the order in which packed and padded attention add up: far below what a shifted
    position or a leaked token changes (0.2 on BERT padded left)."""
    return torch.allclose(a.float(), b.float(), atol=1e-4, rtol=1e-3)


def weights_are_finite(module: nn.Module) -> bool:
    """No NaN or inf in any trainable weight (a frozen, unregistered base is not looked at)."""
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())
