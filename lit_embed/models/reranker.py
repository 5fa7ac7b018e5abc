"""The reranker: a cross-encoder that reads a query and a document as one sequence and gives one relevance score.

It is a sentence-transformers ``CrossEncoder`` (so the finetuned model loads as ``CrossEncoder(path)`` with no
lit_embed import) built from a cross-encoder directory, or from any encoder with a fresh one-score head, as
``CrossEncoder(model, num_labels=1)`` builds it. Training reads each (query, candidate) pair packed without padding
(:mod:`lit_embed.data.pairs` joins them from the token store) and scores it as ``CrossEncoder.predict`` does before
its activation: the score is a logit.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sentence_transformers import CrossEncoder
from torch import Tensor, nn

from lit_embed.batch import Features, PackedTexts, padding_groups
from lit_embed.data.pairs import PairFormat
from lit_embed.errors import LitEmbedError, check, is_bool, is_int, is_number
from lit_embed.internals import attention_implementation, set_attention_implementation
from lit_embed.models.encoder import (
    DEFAULT_LENGTH_GROUPS,
    TextKind,
    _loading_kwargs,
    check_position_limit,
    close,
    recompute_activations,
)
from lit_embed.models.model_folder import check_model_folder, loading_errors
from lit_embed.models.packed import attend_all, install_packed_attention

log = logging.getLogger(__name__)


def has_score_head(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a cross-encoder with one score already (else it gets a fresh one-score head)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    values = json.loads(config.read_text(encoding="utf-8"))
    architectures = values.get("architectures") or [""]
    labels = len(values.get("id2label") or {}) or values.get("num_labels", 2)
    return architectures[0].endswith("ForSequenceClassification") and labels == 1


class Reranker(nn.Module):
    """(query, document) pairs -> relevance logits with a sentence-transformers ``CrossEncoder``.

    Args:
        model_name_or_path: a cross-encoder directory with one score (kept as it is), or any encoder directory
            (a sentence-transformers one included): its transformer gets a fresh one-score head.
        max_seq_length: the longest pair it reads, template included (None: the model's own, e.g. 512 for BERT);
            longer pairs are cut as its tokenizer cuts them (the longer text first).
        query_prompt, document_prompt: must be None (the keys of a model config; a reranker takes no prompts).
        trust_remote_code, model_kwargs, dtype, load_in_4bit: as for :class:`~lit_embed.models.encoder.Encoder`.
        head_lr_scale: a fresh score head learns at this multiple of the learning rate (a head kept from a
            cross-encoder learns at the rate itself).
    """

    reads_pairs = True  # a batch gives it pairs to score, not texts to embed (PairBatch.outputs)

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
        head_lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        check(
            max_seq_length is None or is_int(max_seq_length) and max_seq_length >= 8,
            "max_seq_length",
            max_seq_length,
            "a whole number of tokens >= 8 (a pair's, template included), or null for the model's own limit",
        )
        check(is_bool(trust_remote_code), "trust_remote_code", trust_remote_code, "true or false")
        for key, value in (("query_prompt", query_prompt), ("document_prompt", document_prompt)):
            # A saved CrossEncoder reads its pairs as given: a prompt in training only would not be in its use.
            check(value is None, key, value, "null: a reranker reads the query and the document as they are")
        path = str(model_name_or_path)
        self.config = {
            "model_name_or_path": path,
            "max_seq_length": max_seq_length,
            "query_prompt": query_prompt,
            "document_prompt": document_prompt,
            "trust_remote_code": trust_remote_code,
            "model_kwargs": dict(model_kwargs or {}),
            "dtype": dtype,
            "load_in_4bit": load_in_4bit,
            "reranker": True,  # lit-embed-export rebuilds a Reranker, not an Encoder, around a checkpoint's weights
        }
        loading = _loading_kwargs(dict(model_kwargs or {}), dtype, load_in_4bit)
        check_model_folder(path, trust_remote_code)
        check(is_number(head_lr_scale) and head_lr_scale > 0, "head_lr_scale", head_lr_scale, "a number > 0")
        self.head_lr_scale = float(head_lr_scale)
        fresh_head = not has_score_head(path)
        self.fresh_head = fresh_head
        with loading_errors(path):
            self.model = CrossEncoder(
                path,
                device="cuda" if load_in_4bit else "cpu",
                trust_remote_code=trust_remote_code,
                model_kwargs=loading,
                num_labels=1 if fresh_head else None,
            )
        if self.model.num_labels != 1:
            raise LitEmbedError(
                f"{path} is a cross-encoder with {self.model.num_labels} outputs; a reranker has one score. Start from "
                "a reranker, or from an encoder (it gets a fresh one-score head)."
            )
        if fresh_head:
            log.info("%s has no one-score head: the reranker starts with a fresh one (trained from scratch).", path)
        if max_seq_length is not None:
            check_position_limit(self.hf_model, max_seq_length)
            self.model.max_length = max_seq_length
        pair_format = PairFormat.of(self.tokenizer, self.model.max_length)
        if pair_format is None:
            raise LitEmbedError(
                f"{path}: its tokenizer does not join a (query, document) pair as the two texts' own tokens in a "
                "fixed template, which the reranker's training reads; use a cross-encoder or encoder with a "
                "BERT-style tokenizer."
            )
        self.pair_format = pair_format
        self.train()

    def fresh_parameters(self) -> list[nn.Parameter]:
        """The weights of a score head made for this training (none for a cross-encoder's own head)."""
        return list(self.hf_model.classifier.parameters()) if self.fresh_head else []

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each layer's activations in backward (see ``Encoder.enable_gradient_checkpointing``)."""
        recompute_activations(self.hf_model)

    @property
    def hf_model(self) -> nn.Module:
        """The Hugging Face model with its score head (``...ForSequenceClassification``)."""
        return self.model[0].model

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id or 0

    @property
    def padding_side(self) -> str:
        return getattr(self.tokenizer, "padding_side", None) or "right"

    @property
    def max_seq_length(self) -> int:
        """The most tokens the token store keeps of one text: a pair's length less its template (the pair is then
        cut to the model's length, the longer text first)."""
        return self.pair_format.text_budget

    @property
    def text_limit(self) -> str:
        """The per-text limit in the user's terms, for the token store's message."""
        pair = self.pair_format
        return (
            f"{pair.text_budget} tokens (model.max_seq_length={pair.max_length} for the pair, less its "
            f"{pair.special_tokens} template tokens)"
        )

    # The token store keeps each text's own ids; the template is added per pair (lit_embed.data.pairs).
    adds_special_tokens = False

    def prompt(self, kind: TextKind) -> str:
        return ""  # none: the token store asks, as it asks an encoder

    def tokenize(self, texts: Sequence[str], kind: TextKind) -> dict[str, Any]:
        """Each text's own token ids, without the pair template, padded: what the token store keeps."""
        return dict(
            self.tokenizer(
                list(texts),
                add_special_tokens=False,
                truncation=True,
                max_length=self.max_seq_length,
                padding=True,
                return_tensors="pt",
            )
        )

    def forward(self, pairs: PackedTexts) -> Tensor:
        """Pairs joined by :class:`PairFormat` -> ``[n]`` logits: packed where the model can, else padded in
        length groups as ``CrossEncoder.predict`` pads them."""
        if pairs.length_groups == 0 and self.packing_unsupported is None:
            return self._forward_packed(pairs)
        rows = sorted(range(len(pairs)), key=pairs.lengths.__getitem__)
        bounds = padding_groups([pairs.lengths[i] for i in rows], pairs.length_groups or DEFAULT_LENGTH_GROUPS)
        groups = [pairs.padded(rows[start:end], self.padding_side, self.pad_token_id) for start, end in bounds]
        logits = torch.cat([self.score_features(features) for features in groups])  # [n], shortest first
        return logits[torch.argsort(torch.tensor(rows, device=logits.device))]

    def score_features(self, features: Features) -> Tensor:
        """Padded tokenizer features -> ``[n]`` logits, as sentence-transformers computes them."""
        features = {key: value for key, value in features.items() if key != "task"}
        return self.model(features)["scores"].squeeze(-1)

    def _forward_packed(self, pairs: PackedTexts) -> Tensor:
        model = self.hf_model
        types = pairs.token_features.get("token_type_ids")
        hidden = model.base_model(
            input_ids=pairs.input_ids,
            position_ids=pairs.position_ids,
            attention_mask=attend_all(pairs.input_ids.device),
            **({"token_type_ids": types} if types is not None else {}),
            packed=pairs,
        ).last_hidden_state[0]  # [T, H]
        first = hidden[pairs.cu_seqlens[:-1].long()][:, None]  # [n, 1, H]: each pair's first token, as a head reads
        return self._head(first).squeeze(-1)

    def _head(self, first: Tensor) -> Tensor:
        """The score head on each pair's first-token state ``[n, 1, H]`` -> ``[n, 1]``: BERT's pooler, dropout and
        classifier, or a head that reads the first token itself (RoBERTa, XLM-R, ELECTRA)."""
        model = self.hf_model
        pooler = getattr(model.base_model, "pooler", None)
        if pooler is not None:
            return model.classifier(model.dropout(pooler(first)))
        return model.classifier(first)

    @functools.cached_property
    def packing_unsupported(self) -> str | None:
        """Why this reranker cannot score packed pairs (None: it can, with the scores of padded ones); where it can,
        the packed attention stays installed from here on."""
        model = self.hf_model
        if not hasattr(model, "classifier"):
            return f"its {type(model).__name__} has no classifier head that packing knows"
        pairs = [("A probe query?", "A probe document, longer than the query is."), ("x", "y z")]
        features = self.model.preprocess(pairs)
        own = attention_implementation(model.config)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                features = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in features.items()}
                padded = self.score_features(features)
                if reason := install_packed_attention(model):
                    return reason
                packed = self._forward_packed(PackedTexts.from_features(self._with_type_ids(features)))
        except Exception as err:  # an architecture that cannot take packed inputs at all
            set_attention_implementation(model.config, own)
            return f"it cannot run packed inputs ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        finally:
            self.train(was_training)
        if not close(packed, padded):
            set_attention_implementation(model.config, own)
            return "its packed scores differ from its padded ones (its attention, positions or head do not pack)"
        return None

    @staticmethod
    def _with_type_ids(features: Features) -> Features:
        # PackedTexts.from_features keeps a feature that is not all 0; the packed path passes type ids as given.
        return {key: value for key, value in features.items() if key != "modality"}

    @torch.no_grad()
    def predict(self, pairs: Sequence[tuple[str, str]], batch_size: int = 64) -> Tensor:
        """``[n]`` float32 logits of (query, document) texts, as ``CrossEncoder.predict`` gives them without its
        activation."""
        was_training = self.training
        try:
            scores = self.model.predict(
                list(pairs),
                batch_size=batch_size,
                activation_fn=nn.Identity(),
                convert_to_tensor=True,
                show_progress_bar=False,
            )
        finally:
            self.train(was_training)
        return scores.float().reshape(len(pairs))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def save(self, path: str | os.PathLike) -> None:
        """Writes a sentence-transformers ``CrossEncoder`` directory (safetensors weights)."""
        self.model.save(str(path), safe_serialization=True)
