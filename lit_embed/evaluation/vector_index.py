"""Retrieval evaluation through a vector database: the corpus embedded once into Qdrant's local mode, queries searched
there, scored with the same metrics as the exact search (``lit-embed-eval --index DIR``).

The database is a folder (``QdrantClient(path=DIR)``, no server) holding one collection, cosine distance, one point
per document with its id in the payload (``doc_id``). ``index.json`` beside it records what the vectors were made
from: a hash of the model's weights, prompt and length limit, the embedding size, and a hash of the corpus ids and
texts. It is written last, so a build that did not finish has none. A later call with the same model and corpus
searches the stored vectors without running the model over the corpus again; any other model or corpus is refused
with what differs, until ``rebuild=True`` (``--rebuild-index``) replaces the collection.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lit_embed.data.schema import QADataset
from lit_embed.errors import LitEmbedError
from lit_embed.evaluation import DEFAULT_K
from lit_embed.evaluation.ir import retrieval_metrics
from lit_embed.evaluation.retrieval import check_truncate_dim, encode_texts
from lit_embed.files import write_text_atomic
from lit_embed.models.embedding_cache import hash_weights
from lit_embed.models.encoder import Encoder

MANIFEST = "index.json"
INSTALL = "pip install 'lit_embed[clients]'"
# Documents embedded and written per chunk: the corpus's vectors are never all in memory at once.
CHUNK_SIZE = 2048


def import_qdrant() -> Any:
    """The ``qdrant_client`` module, or one message naming the extra that installs it."""
    try:
        import qdrant_client
    except ImportError:
        raise LitEmbedError(f"--index needs qdrant-client, which is not installed: {INSTALL}") from None
    return qdrant_client


def fingerprint(encoder: Encoder, dataset: QADataset, truncate_dim: int | None) -> dict[str, Any]:
    """What the stored vectors depend on: the model (its modules and their settings, such as pooling, the weights, the
    document prompt, the length limit), their size, the corpus. Not the model's path: a moved model is the same."""
    model = hashlib.sha256()
    model.update(json.dumps([repr(encoder.model), encoder.prompt("document"), encoder.max_seq_length]).encode())
    hash_weights(encoder, model)
    corpus = hashlib.sha256()
    for doc_id, text in dataset.corpus.items():
        corpus.update(json.dumps([doc_id, text]).encode())
        corpus.update(b"\0")
    return {
        "model_sha256": model.hexdigest(),
        "dimension": truncate_dim or encoder.embedding_dim,
        "corpus_sha256": corpus.hexdigest(),
        "documents": len(dataset.corpus),
    }


def collection_name(data: str | os.PathLike) -> str:
    """The collection of a data file: its name without the extension, in the characters every store accepts."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(data).stem) or "corpus"


def _chunks(items: list[str], size: int) -> Iterator[tuple[int, list[str]]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def _check_reusable(directory: Path, manifest: dict[str, Any], expected: dict[str, Any]) -> None:
    changed = [key for key, value in expected.items() if manifest.get("fingerprint", {}).get(key) != value]
    if changed:
        what = {
            "model_sha256": "the model's modules, weights, prompt or length limit",
            "dimension": "the embedding size (--truncate-dim)",
            "corpus_sha256": "the corpus's ids or texts",
            "documents": "the number of documents",
        }
        raise LitEmbedError(
            f"{directory} holds an index built from another model or corpus ({manifest.get('model')}, "
            f"{manifest.get('data')}); changed: {', '.join(what[key] for key in changed)}. Pass --rebuild-index "
            "(rebuild_index=True) to replace it, or choose another --index folder."
        )


def _read_manifest(path: Path) -> dict[str, Any] | None:
    """``index.json``, or None when there is none or it is unreadable (a build that did not finish)."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and "collection" in manifest else None


def build_or_open(
    client: Any,
    directory: Path,
    encoder: Encoder,
    dataset: QADataset,
    name: str,
    batch_size: int,
    truncate_dim: int | None,
    rebuild: bool,
    described: dict[str, str],
) -> tuple[str, bool]:
    """Makes sure a collection of ``client`` holds ``dataset``'s corpus as ``encoder`` embeds it.

    Returns its name (``name``, or the stored one when reused) and whether it was built now.
    """
    from qdrant_client import models

    expected = fingerprint(encoder, dataset, truncate_dim)
    manifest_path = directory / MANIFEST
    manifest = _read_manifest(manifest_path)
    if manifest is not None and not rebuild:
        _check_reusable(directory, manifest, expected)
        name = manifest["collection"]
        if client.collection_exists(name) and client.count(name, exact=True).count == expected["documents"]:
            return name, False
        raise LitEmbedError(
            f"{directory}: the collection {name!r} that {MANIFEST} describes is missing or incomplete. Pass "
            "--rebuild-index (rebuild_index=True) to build it again."
        )
    if manifest is None and not rebuild and client.get_collections().collections:
        raise LitEmbedError(
            f"{directory} holds a Qdrant database that lit-embed-eval did not finish building (no {MANIFEST}): an "
            "interrupted build, or another tool's data. Pass --rebuild-index (rebuild_index=True) to (re)build the "
            f"collection {name!r} there, or choose another --index folder."
        )
    manifest_path.unlink(missing_ok=True)  # a build that stops half-way must not look finished
    if manifest is not None and client.collection_exists(manifest["collection"]):
        client.delete_collection(manifest["collection"])
    if client.collection_exists(name):
        client.delete_collection(name)
    client.create_collection(
        name, vectors_config=models.VectorParams(size=expected["dimension"], distance=models.Distance.COSINE)
    )
    doc_ids = list(dataset.corpus)
    for start, ids in _chunks(doc_ids, CHUNK_SIZE):
        vectors = encode_texts(encoder, [dataset.corpus[d] for d in ids], "document", batch_size, truncate_dim)
        client.upsert(
            name,
            points=models.Batch(
                ids=list(range(start, start + len(ids))),
                vectors=vectors.float().cpu().numpy().tolist(),
                payloads=[{"doc_id": doc_id} for doc_id in ids],
            ),
        )
    write_text_atomic(
        manifest_path, json.dumps({"collection": name, **described, "fingerprint": expected}, indent=2) + "\n"
    )
    return name, True


def evaluate_with_index(
    encoder: Encoder,
    dataset: QADataset,
    directory: str | os.PathLike,
    data: str | os.PathLike,
    model: str | os.PathLike,
    batch_size: int = 64,
    truncate_dim: int | None = None,
    rebuild: bool = False,
) -> dict[str, float]:
    """The metrics of :func:`~lit_embed.evaluation.retrieval.evaluate_encoder`, searching a Qdrant local database.

    Args:
        encoder: embeds the queries (and the corpus, when the index is built).
        dataset: queries, corpus and relevant documents.
        directory: the database's folder; created when missing.
        data: the data file, which names the collection.
        model: the model's directory, recorded in ``index.json``.
        batch_size: texts per encoder call.
        truncate_dim: index and search only the first this many dimensions (None = all).
        rebuild: replace an index built from another model or corpus, or one whose build did not finish.

    Returns:
        ``{"mrr@10": ..., ...}``: hits ranked by score, equal scores by document id, as the exact search ranks them.
    """
    import_qdrant()
    from qdrant_client import QdrantClient, models

    check_truncate_dim(truncate_dim, encoder.embedding_dim)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise LitEmbedError(f"--index {directory} is a file; pass a folder for the Qdrant database.")
    directory.mkdir(parents=True, exist_ok=True)
    described = {"model": str(Path(model).resolve()), "data": str(Path(data).resolve())}
    try:
        client = QdrantClient(path=str(directory))
    except RuntimeError as err:  # local mode locks its folder: one client at a time
        raise LitEmbedError(
            f"--index {directory}: {err} Wait for the other process (another lit-embed-eval, a notebook) to close it, "
            "or choose another folder."
        ) from None
    try:
        name, built = build_or_open(
            client, directory, encoder, dataset, collection_name(data), batch_size, truncate_dim, rebuild, described
        )
        # On stderr: stdout is the metrics (--json).
        action = "Built" if built else "Reusing"
        print(
            f"{action} the index {directory} (collection {name!r}, {len(dataset.corpus)} documents).", file=sys.stderr
        )
        top_k = max(k for ks in DEFAULT_K.values() for k in ks)
        query_ids = [q for q in dataset.queries if dataset.relevant_docs.get(q)]
        relevance, num_relevant = [], []
        for _, ids in _chunks(query_ids, CHUNK_SIZE):
            vectors = encode_texts(encoder, [dataset.queries[q] for q in ids], "query", batch_size, truncate_dim)
            requests = [
                models.QueryRequest(query=vector, limit=top_k, with_payload=["doc_id"])
                for vector in vectors.float().cpu().numpy().tolist()
            ]
            for query_id, response in zip(ids, client.query_batch_points(name, requests=requests), strict=True):
                # The exact search's order: by score, equal scores by document id.
                hits = sorted(response.points, key=lambda p: (-p.score, p.payload["doc_id"]))
                relevant = set(dataset.relevant_docs[query_id])
                relevance.append([p.payload["doc_id"] in relevant for p in hits] + [False] * (top_k - len(hits)))
                num_relevant.append(len(relevant))
    finally:
        client.close()
    return retrieval_metrics(torch.tensor(relevance, dtype=torch.bool), torch.tensor(num_relevant), DEFAULT_K)
