"""Adapter training's encoder: a frozen base whose embeddings are computed once per text, then a trainable head.

Training the head never runs the base encoder again: its embeddings are kept in an in-memory table and cached on
disk across runs, keyed by everything that could change them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lit_embed.batch import PackedTexts
from lit_embed.errors import LitEmbedError, check, is_int
from lit_embed.models.embedding_cache import DEFAULT_CACHE_DIR, cached_embeddings
from lit_embed.models.encoder import Encoder, TextKind
from lit_embed.models.precomputed import PrecomputedEmbeddings
from lit_embed.models.saving import dense_modules, save_head, save_llamaindex_adapter

log = logging.getLogger(__name__)


class AdaptedEncoder(nn.Module):
    """A frozen encoder followed by a trainable adapter, with the encoder's embeddings cached per text.

    It is a drop-in for :class:`Encoder` in the LightningModule, the data module and the IR callback:
    ``tokenize`` embeds each new text once with the frozen encoder (or loads it from ``cache_dir``) and returns
    its row in the in-memory table as the text's one token, and ``forward`` is a table lookup followed by the
    adapter. Only the adapter
    is a registered submodule, so only it trains and only it is saved in checkpoints.

    Args:
        base: the frozen encoder, or vectors computed elsewhere (:class:`PrecomputedEmbeddings`).
        adapter: ``adapter(in_dim=...) -> nn.Module`` (a Hydra partial of :class:`LinearAdapter` /
            :class:`MLPAdapter`); its ``transform`` says whether documents are mapped too.
        cache_dir: where base embeddings are cached across runs (None = no disk cache).
        batch_size: texts per encoder call when filling the cache.
    """

    def __init__(
        self,
        base: Encoder | PrecomputedEmbeddings,
        adapter: Callable[..., nn.Module],
        cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
        batch_size: int = 64,
    ) -> None:
        super().__init__()
        check(
            is_int(batch_size) and batch_size >= 1,
            "method.encoder.batch_size",
            batch_size,
            "a whole number of texts >= 1",
        )
        check(
            cache_dir is None or isinstance(cache_dir, str | os.PathLike),
            "method.encoder.cache_dir",
            cache_dir,
            "a folder for the cached embeddings, or null for no disk cache",
        )
        check(callable(adapter), "method.encoder.adapter", adapter, "an adapter config: adapter=linear or adapter=mlp")
        self.__dict__["base"] = base.requires_grad_(False).eval()  # not a submodule: frozen, not checkpointed
        self.adapter = adapter(in_dim=base.embedding_dim)
        same_size = self.adapter.out_dim == base.embedding_dim
        self.transform = self.adapter.transform or ("query" if same_size else "both")
        if self.transform == "query" and not same_size:
            raise LitEmbedError(
                f"adapter.transform=query needs the adapter to keep the embedding size ({base.embedding_dim}), "
                f"but out_dim is {self.adapter.out_dim}: set adapter.transform=both so documents are mapped too."
            )
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.batch_size = batch_size
        self.rows: dict[str, dict[str, int]] = {"query": {}, "document": {}}
        self.register_buffer("query_table", torch.empty(0, base.embedding_dim), persistent=False)
        self.register_buffer("document_table", torch.empty(0, base.embedding_dim), persistent=False)
        self.config = {
            "base": base.config,
            "base_class": type(base).__name__,
            "adapter": {"class": type(self.adapter).__name__, **self.adapter.init_args(), "transform": self.transform},
        }

    packing_unsupported = None  # a text is one row of the table: packed and padded are the same

    @property
    def embedding_dim(self) -> int:
        return self.adapter.out_dim

    @property
    def pad_token_id(self) -> int:
        return 0

    @property
    def max_seq_length(self) -> int:
        return self.base.max_seq_length

    @property
    def tokenizer(self) -> Any:
        """The base model's tokenizer (None over vectors computed elsewhere)."""
        return getattr(self.base, "tokenizer", None)

    @property
    def device(self) -> torch.device:
        return self.query_table.device

    def _table(self, kind: TextKind) -> Tensor:
        return self.query_table if kind == "query" else self.document_table

    def tokenize(self, texts: Sequence[str], kind: TextKind) -> dict[str, Any]:
        """Rows of the embedding table for ``texts`` (new texts are embedded by the frozen encoder first)."""
        return self._rows_of(texts, kind, self.batch_size)

    def _rows_of(self, texts: Sequence[str], kind: TextKind, batch_size: int) -> dict[str, Any]:
        rows = self.rows[kind]
        new = list(dict.fromkeys(t for t in texts if t not in rows))
        if new:
            embeddings = self._base_embeddings(new, kind, batch_size).to(self.device)
            for text in new:
                rows[text] = len(rows)
            name = f"{kind}_table"
            setattr(self, name, torch.cat([getattr(self, name), embeddings]))
        ids = torch.tensor([[rows[t]] for t in texts], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "kind": kind}

    def _base_embeddings(self, texts: list[str], kind: TextKind, batch_size: int) -> Tensor:
        if isinstance(self.base, PrecomputedEmbeddings):
            return self.base.vectors(texts, kind)
        return cached_embeddings(self.base.to(self.device), texts, kind, batch_size, self.cache_dir)

    def adapts(self, kind: TextKind) -> bool:
        return kind == "query" or self.transform == "both"

    def forward(self, texts: PackedTexts) -> Tensor:
        """Texts tokenized by :meth:`tokenize` (one token each: its row of the table) -> ``[n, D]``."""
        return self._adapted(texts.input_ids[0], texts.extras["kind"])

    def packs(self, texts: PackedTexts) -> bool:
        return True

    def _adapted(self, rows: Tensor, kind: TextKind) -> Tensor:
        embeddings = self._table(kind)[rows]  # [n, D] cached base embeddings
        return self.adapter(embeddings) if self.adapts(kind) else embeddings

    @torch.no_grad()
    def encode(self, texts: Sequence[str], kind: TextKind, batch_size: int = 64) -> Tensor:
        """``[len(texts), D]``: base embeddings (new texts embedded ``batch_size`` at a time), then the head."""
        rows = self._rows_of(texts, kind, batch_size)["input_ids"][:, 0]
        return self._adapted(rows.to(self.device), kind).float()

    def save(self, path: str | os.PathLike) -> None:
        """A sentence-transformers directory: the base model, then the adapter as plain ``Dense`` modules.

        With ``transform=query`` the adapter sits on a ``Router`` query route, so ``encode_query`` maps queries
        and ``encode_document`` returns the base model's document embeddings unchanged. Over vectors from
        elsewhere (an embedding API) there is no text model to save: only the head, to apply to those vectors.
        """
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.base.modules import Router

        if isinstance(self.base, PrecomputedEmbeddings):
            save_head(self.adapter, self.config["adapter"], path)
            return
        head = dense_modules(self.adapter)
        if self.transform == "query":
            head = [Router.for_query_document(query_modules=head, document_modules=[])]
        model = SentenceTransformer(modules=[*self.base.model, *head], device="cpu")
        model.prompts = dict(self.base.model.prompts)
        model.save(str(path), safe_serialization=True)

    def save_llamaindex_adapter(self, path: str | os.PathLike) -> bool:
        """Writes the head as LlamaIndex's ``AdapterEmbeddingModel`` reads it; returns whether it could.

        LlamaIndex maps queries only, so only ``transform=query`` adapters can be written.
        """
        if self.transform != "query":
            return False
        save_llamaindex_adapter(self.adapter, path)
        return True


def query_route_warning(
    encoder: AdaptedEncoder, model_dir: str | os.PathLike, llamaindex_dir: str | os.PathLike
) -> str | None:
    """What to tell whoever exports a ``transform=query`` adapter: which calls give adapted query vectors.

    The head sits on the query route of a ``Router`` whose default is the document route, so that ``model_dir``
    stays the base model for documents and for LlamaIndex's ``AdapterEmbeddingModel``. A ``Router`` routes on the
    task only, never on ``prompt_name``: plain ``encode()`` (``prompt_name="query"`` included) and LlamaIndex's
    ``HuggingFaceEmbedding``, which passes no task, return the base model's query vectors without an error. The
    message says so, naming the calls that do map queries. None when there is nothing to warn about (the head maps
    documents too, or the base is precomputed vectors with no text model saved).
    """
    if encoder.transform != "query" or isinstance(encoder.base, PrecomputedEmbeddings):
        return None
    adapter_cls = encoder.adapter.llamaindex_class
    return (
        f"{model_dir} maps queries only when asked for the query task (the adapter sits on a Router's query route; "
        "its default route is the document one). Adapted query vectors come from model.encode_query(texts) or "
        'model.encode(texts, task="query") in sentence-transformers, and in LlamaIndex from AdapterEmbeddingModel('
        f'HuggingFaceEmbedding(model_name="{model_dir}"), "{llamaindex_dir}", adapter_cls={adapter_cls}) (from '
        f"llama_index.embeddings.adapter.utils import {adapter_cls}). Plain model.encode(texts) "
        f'(prompt_name="query" too) and HuggingFaceEmbedding(model_name="{model_dir}") alone return the base '
        "model's query vectors, unadapted, without an error. Documents are the base model's vectors in every call."
    )


def warn_query_route(encoder: AdaptedEncoder, model_dir: str | os.PathLike, llamaindex_dir: str | os.PathLike) -> None:
    """Logs :func:`query_route_warning` as a warning, when there is one (training's finish and lit-embed-export)."""
    message = query_route_warning(encoder, model_dir, llamaindex_dir)
    if message is not None:
        log.warning("%s", message)
