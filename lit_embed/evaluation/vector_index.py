"""Retrieval evaluation through a vector database: the corpus embedded once into Qdrant's local mode, queries searched
there, scored with the same metrics as the exact search (``lit-embed-eval --index DIR``).

The database is a folder (``QdrantClient(path=DIR)``, no server) holding one collection, cosine distance, one point
per document with its id in the payload (``doc_id``). ``index.json`` beside it records what the vectors were made
from: a hash of the model's weights, prompt and length limit, the embedding size, and a hash of the corpus ids and
texts. A build writes it first without that fingerprint and again, with it, last; so ``index.json`` proves the folder
is lit_embed's, and its fingerprint that the build finished. A later call with the same model and corpus searches the
stored vectors without running the model over the corpus again; any other model or corpus is refused with what
differs, until ``rebuild=True`` (``--rebuild-index``) replaces the collection.

An index that is not whole (a build that did not finish, Qdrant's files cut short or deleted, an ``index.json`` that is
not JSON) is built again with one warning, in a folder that holds nothing but the index. Files that are not the
index's are never deleted: where they are, or where no ``index.json`` says the database is lit_embed's, the call is
refused with what to do.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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

log = logging.getLogger(__name__)

MANIFEST = "index.json"
QDRANT_META, QDRANT_LOCK, QDRANT_COLLECTIONS = "meta.json", ".lock", "collection"  # all QdrantClient(path=) writes
# What Qdrant raises reading a damaged folder: meta.json cut short or not JSON (ValueError), of another shape
# (TypeError, LookupError; pydantic's ValidationError is a ValueError), points it cannot read (sqlite3, pickle).
DAMAGED = (ValueError, TypeError, LookupError, EOFError, sqlite3.DatabaseError, pickle.UnpicklingError)
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


def _read_manifest(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(manifest, why it is not a finished build's)``: ``(None, None)`` when there is none."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError):
        return None, f"{MANIFEST} is not JSON"
    if not isinstance(manifest, dict) or not re.fullmatch(r"[A-Za-z0-9_-]+", str(manifest.get("collection"))):
        return None, f"{MANIFEST} is not the one lit-embed-eval writes"
    if not isinstance(manifest.get("fingerprint"), dict):
        return manifest, "its build did not finish"
    return manifest, None


def _not_the_index(directory: Path, collections: set[str]) -> list[str]:
    """What the folder holds beside the index (``index.json``, Qdrant's files, ``collections``): never deleted."""
    others = []
    for entry in sorted(directory.iterdir()):
        if entry.name in (MANIFEST, QDRANT_META, QDRANT_LOCK) or entry.name.startswith(f".{MANIFEST}."):
            continue  # the last: write_text_atomic's temporary files
        if entry.name == QDRANT_COLLECTIONS and entry.is_dir():
            others += [f"{entry.name}/{c.name}" for c in sorted(entry.iterdir()) if c.name not in collections]
        else:
            others.append(entry.name)
    return others


def _refuse_others(directory: Path, problem: str, others: list[str]) -> None:
    if others:
        raise LitEmbedError(
            f"--index {directory}: {problem}, and the folder holds files that are not the index's "
            f"({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}), which lit-embed-eval does not delete. "
            "Move them out of it, or choose another --index folder."
        )


def open_client(directory: Path, name: str, rebuild: bool) -> Any:
    """A client of the database in ``directory``. One Qdrant cannot read is emptied first, with one warning, where the
    folder holds the index and nothing else and ``index.json`` (or ``rebuild``) says it is lit_embed's; refused
    otherwise."""
    try:
        return _client(directory)
    except DAMAGED as err:
        problem = f"Qdrant cannot read its files ({type(err).__name__}: {(str(err) or '?').splitlines()[0]})"
    if not (directory / MANIFEST).exists() and not rebuild:
        raise LitEmbedError(
            f"--index {directory}: {problem}, and no {MANIFEST} says lit-embed-eval built it. Pass --rebuild-index "
            "(rebuild_index=True) to delete this Qdrant database and build the index there, or choose another "
            "--index folder."
        )
    manifest, _ = _read_manifest(directory / MANIFEST)
    _refuse_others(directory, problem, _not_the_index(directory, {name, *_collection_of(manifest)}))
    with _held(directory / QDRANT_LOCK):  # Qdrant's own lock: no other client is reading or writing it meanwhile
        log.warning("--index %s: %s: building the index again.", directory, problem)
        (directory / MANIFEST).unlink(missing_ok=True)
        (directory / QDRANT_META).unlink(missing_ok=True)
        shutil.rmtree(directory / QDRANT_COLLECTIONS, ignore_errors=True)
    return _client(directory)


def _collection_of(manifest: dict[str, Any] | None) -> list[str]:
    return [manifest["collection"]] if manifest is not None else []


def _client(directory: Path) -> Any:
    from qdrant_client import QdrantClient

    try:
        return QdrantClient(path=str(directory))
    except RuntimeError as err:  # local mode locks its folder: one client at a time
        raise _in_use(directory, str(err)) from None


def _in_use(directory: Path, why: str) -> LitEmbedError:
    return LitEmbedError(
        f"--index {directory}: {why} Wait for the other process (another lit-embed-eval, a notebook) to close it, "
        "or choose another folder."
    )


@contextmanager
def _held(path: Path) -> Iterator[None]:
    # The lock QdrantClient takes (portalocker: flock on POSIX), without waiting.
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(path.parent, "another Qdrant client has it open.") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
    manifest, problem = _read_manifest(manifest_path)
    if not rebuild:
        if manifest is not None and problem is None:
            _check_reusable(directory, manifest, expected)
            stored = manifest["collection"]
            if client.collection_exists(stored) and client.count(stored, exact=True).count == expected["documents"]:
                return stored, False
            problem = f"the collection {stored!r} that {MANIFEST} describes is missing or incomplete"
        collections = {c.name for c in client.get_collections().collections}
        if not manifest_path.exists() and collections:
            raise LitEmbedError(
                f"{directory} holds a Qdrant database that lit-embed-eval did not finish building (no {MANIFEST}): "
                "an interrupted build, or another tool's data. Pass --rebuild-index (rebuild_index=True) to (re)build "
                f"the collection {name!r} there, or choose another --index folder."
            )
        if problem is not None:
            if manifest is None:  # an index.json lit-embed-eval cannot read: the folder must hold nothing else
                _refuse_others(directory, problem, _not_the_index(directory, {name}))
            log.warning("--index %s: %s: building the index again.", directory, problem)
    # Before the collection changes: a build that stops half-way leaves a manifest without a fingerprint.
    write_text_atomic(manifest_path, json.dumps({"collection": name, **described}, indent=2) + "\n")
    for stale in {name, *_collection_of(manifest)}:
        client.delete_collection(stale)  # also removes a folder Qdrant's meta.json no longer lists
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
        rebuild: replace an index built from another model or corpus, or a Qdrant database no ``index.json`` says
            lit_embed built (an unfinished build needs none: it is built again).

    Returns:
        ``{"mrr@10": ..., ...}``: hits ranked by score, equal scores by document id, as the exact search ranks them.
    """
    import_qdrant()
    from qdrant_client import models

    check_truncate_dim(truncate_dim, encoder.embedding_dim)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise LitEmbedError(f"--index {directory} is a file; pass a folder for the Qdrant database.")
    directory.mkdir(parents=True, exist_ok=True)
    described = {"model": str(Path(model).resolve()), "data": str(Path(data).resolve())}
    client = open_client(directory, collection_name(data), rebuild)
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
