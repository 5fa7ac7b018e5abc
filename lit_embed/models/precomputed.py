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
from lit_embed.data.schema import read_text
from lit_embed.errors import LitEmbedError
from lit_embed.models.encoder import TextKind


def read_embedding_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``id -> vector`` from ``.npy`` (rows, with the ids as a JSON list in the ``.json`` file of the same name)
    or ``.parquet`` (columns ``id`` and ``embedding``); anything else is one :class:`LitEmbedError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise LitEmbedError(f"{path}: no such file. Check the path of the embeddings.")
    if path.suffix == ".npy":
        ids, vectors = _read_npy(path)
    elif path.suffix == ".parquet":
        ids, vectors = _read_parquet(path)
    else:
        raise LitEmbedError(f"{path}: use .npy (with a .json list of ids beside it) or .parquet (id, embedding).")
    if vectors.ndim != 2 or len(ids) != len(vectors) or vectors.shape[1] == 0:
        raise LitEmbedError(
            f"{path}: {len(ids)} ids for vectors of shape {vectors.shape}; expected one vector of one size >= 1 per id."
        )
    if not all(isinstance(i, str | int) and not isinstance(i, bool) for i in ids):
        bad = next(i for i in ids if not isinstance(i, str | int) or isinstance(i, bool))
        raise LitEmbedError(
            f"{path}: id {bad!r} is not a text or a whole number; give every vector the id of its text."
        )
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise LitEmbedError(f"{path}: an id appears twice; each id needs exactly one vector.")
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        raise LitEmbedError(
            f"{path}: the vector of id {ids[int(np.argmin(finite))]!r} holds NaN or inf; embed it again."
        )
    return dict(zip(ids, vectors, strict=True))


def _read_npy(path: Path) -> tuple[list, np.ndarray]:
    ids_path = path.with_suffix(".json")
    if not ids_path.is_file():
        raise LitEmbedError(f"{path}: the ids of its rows are missing; write them as a JSON list to {ids_path}.")
    try:
        vectors = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise LitEmbedError(f"{path}: not a readable .npy array ({err}). Write it with numpy.save.") from None
    try:
        ids = json.loads(read_text(ids_path))
    except (json.JSONDecodeError, RecursionError) as err:
        raise LitEmbedError(
            f"{ids_path}: not a JSON list of ids ({err}); it gives {path.name}'s rows their ids."
        ) from None
    if not isinstance(ids, list):
        raise LitEmbedError(f"{ids_path}: expected a JSON list of ids, one per row of {path.name}.")
    return ids, _as_float32(vectors, path)


def _read_parquet(path: Path) -> tuple[list, np.ndarray]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise LitEmbedError(f"{path}: reading parquet needs pyarrow: pip install 'lit_embed[parquet]'.") from None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise LitEmbedError(f"{path}: not a readable Parquet file ({err}). Write it again.") from None
    if not {"id", "embedding"} <= set(table.column_names):
        raise LitEmbedError(f"{path}: needs columns 'id' and 'embedding', has {table.column_names}.")
    rows = table.column("embedding").to_pylist()
    try:
        vectors = np.asarray(rows, dtype=np.float32)
    except (ValueError, TypeError):
        raise LitEmbedError(f"{path}: every 'embedding' must be a list of numbers of one length.") from None
    return table.column("id").to_pylist(), vectors


def _as_float32(vectors: np.ndarray, path: Path) -> np.ndarray:
    if vectors.dtype.kind not in "iuf":  # bools, complex numbers, texts, dates are no embeddings
        raise LitEmbedError(f"{path}: the array holds {vectors.dtype} values; embeddings are numbers (float32).")
    return vectors.astype(np.float32)


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
