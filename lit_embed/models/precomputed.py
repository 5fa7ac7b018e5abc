"""Embeddings computed elsewhere (a hosted embedding API), read from files: a base for adapter training."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lit_embed.data.formats import load_dataset
from lit_embed.errors import LitEmbedError
from lit_embed.models.encoder import TextKind


def read_embedding_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``id -> vector`` from ``.npy`` (rows, with the ids as a JSON list in the ``.json`` file of the same name)
    or ``.parquet`` (columns ``id`` and ``embedding``)."""
    path = Path(path)
    if path.suffix == ".npy":
        ids_path = path.with_suffix(".json")
        if not ids_path.is_file():
            raise LitEmbedError(f"{path}: the ids of its rows are missing; write them as a JSON list to {ids_path}.")
        vectors = np.load(path, allow_pickle=False)
        ids = json.loads(ids_path.read_text(encoding="utf-8"))
        if vectors.ndim != 2 or len(ids) != len(vectors):
            raise LitEmbedError(f"{path}: {len(ids)} ids in {ids_path.name} for an array of shape {vectors.shape}.")
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise LitEmbedError(f"{path}: reading parquet needs pyarrow: pip install 'lit_embed[parquet]'.") from None
        table = pq.read_table(path)
        if not {"id", "embedding"} <= set(table.column_names):
            raise LitEmbedError(f"{path}: needs columns 'id' and 'embedding', has {table.column_names}.")
        ids = [str(i) for i in table.column("id").to_pylist()]
        vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    else:
        raise LitEmbedError(f"{path}: use .npy (with a .json list of ids beside it) or .parquet (id, embedding).")
    if len(set(ids)) != len(ids):
        raise LitEmbedError(f"{path}: an id appears twice; each id needs exactly one vector.")
    return dict(zip((str(i) for i in ids), vectors.astype(np.float32), strict=True))


class PrecomputedEmbeddings(nn.Module):
    """Stands in for an :class:`~lit_embed.models.encoder.Encoder` when the vectors come from files.

    The files hold vectors by id; the datasets give each id its text, so the rest of lit_embed can ask for the
    embedding of a text as usual. Only ``method=adapter`` can train on it: there is no encoder to finetune.

    Args:
        query_embeddings: vectors of every training and validation query, by query id.
        document_embeddings: vectors of every corpus document, by document id.
        datasets: the LlamaIndex ``.json`` / ``.jsonl`` files whose ids the vectors belong to.
    """

    def __init__(self, query_embeddings: str, document_embeddings: str, datasets: Sequence[str | None] = ()) -> None:
        super().__init__()
        self.config = {"query_embeddings": str(query_embeddings), "document_embeddings": str(document_embeddings)}
        self.lookup: dict[str, dict[str, np.ndarray]] = {"query": {}, "document": {}}
        self.sources = {"query": str(query_embeddings), "document": str(document_embeddings)}
        vectors = {kind: read_embedding_file(path) for kind, path in self.sources.items()}
        for data_path in filter(None, datasets):
            data = load_dataset(data_path)
            for kind, texts in (("query", data.queries), ("document", data.corpus)):
                for key, text in texts.items():
                    if key not in vectors[kind]:
                        raise LitEmbedError(
                            f"{self.sources[kind]}: no vector for {kind} id {key!r} of {data_path}. "
                            "Embed every query and document of the training and validation files."
                        )
                    self.lookup[kind][text] = vectors[kind][key]
        sizes = {v.shape[0] for table in vectors.values() for v in table.values()}
        if len(sizes) != 1:
            raise LitEmbedError(f"query and document vectors must have one size, found sizes {sorted(sizes)}.")
        self.embedding_dim = sizes.pop()
        self.max_seq_length = 2**31  # nothing is tokenized, so nothing is ever cut

    def prompt(self, kind: TextKind) -> str:
        return ""

    def vectors(self, texts: Sequence[str], kind: TextKind) -> Tensor:
        """``[len(texts), D]``: the file's vector of each text's id."""
        missing = next((t for t in texts if t not in self.lookup[kind]), None)
        if missing is not None:
            raise LitEmbedError(f"{self.sources[kind]}: no vector for the {kind} text {missing[:80]!r}.")
        return torch.from_numpy(np.stack([self.lookup[kind][t] for t in texts]))
