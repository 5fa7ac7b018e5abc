"""Reading, validating and writing retrieval training data.

The formats, chosen by the file's extension:

* ``.json``: LlamaIndex's ``EmbeddingQAFinetuneDataset``
  ``{"queries": {qid: text}, "corpus": {doc_id: text}, "relevant_docs": {qid: [doc_id, ...]}, "mode": "text"}``.
* ``.jsonl``: one ``{"query": ..., "positive": ..., "negatives": [...]}`` object per line (negatives optional).
* ``.csv``, ``.parquet`` or a ``datasets`` ``save_to_disk`` directory: one pair per row (``lit_embed.data.tables``).

Both load into a :class:`QADataset`, the one in-memory shape the rest of lit_embed works with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_embed.errors import LitEmbedError
from lit_embed.files import open_atomic


class DataFormatError(LitEmbedError, ValueError):
    """The data file is unusable; the message says where and how to fix it."""


@dataclass
class QADataset:
    """Queries, documents and which documents answer which query.

    Attributes:
        queries: query id -> query text.
        corpus: document id -> document text.
        relevant_docs: query id -> ids of the documents that answer it (at least one each).
        hard_negatives: query id -> ids of documents known NOT to answer it (optional).
    """

    queries: dict[str, str]
    corpus: dict[str, str]
    relevant_docs: dict[str, list[str]]
    hard_negatives: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingExample:
    """One row of a contrastive batch: a query, the document that answers it, and optional hard negatives."""

    query: str
    positive: str
    negatives: tuple[str, ...] = ()
    query_id: str = field(default="", compare=False)  # where the row came from, for error messages

    def texts(self) -> tuple[str, ...]:
        return (self.query, self.positive, *self.negatives)


def load_dataset(path: str | os.PathLike, columns: dict[str, str] | None = None) -> QADataset:
    """Loads and validates training data; the extension picks the format.

    ``.json`` (LlamaIndex), ``.jsonl`` (query/positive/negatives lines), or a table: ``.csv``, ``.parquet`` or a
    ``datasets`` ``save_to_disk`` directory, whose column names ``columns`` gives (see
    :func:`lit_embed.data.tables.load_table`; JSON files have fixed keys and ignore it).
    """
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{path}: no such file. Check the path (relative paths are resolved from {Path.cwd()}).")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in (".csv", ".parquet"):
        from lit_embed.data.tables import load_table  # tables imports this module

        return load_table(path, columns)
    if suffix == ".json":
        return load_llamaindex_json(path)
    if suffix == ".jsonl":
        return load_jsonl(path)
    raise DataFormatError(
        f"{path}: unknown extension {path.suffix!r}. Use .json for LlamaIndex's EmbeddingQAFinetuneDataset, "
        ".jsonl for one {'query', 'positive', 'negatives'} object per line, .csv or .parquet for a table with those "
        "columns (data.columns renames them), or a directory saved by datasets' save_to_disk."
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataFormatError(
            f"{path}, line {line}: the file is not valid UTF-8 (byte offset {err.start}). "
            "Re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8`."
        ) from None


def _reject_duplicate_keys(path: Path):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            dup = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise DataFormatError(f"{path}: id {dup!r} appears twice in one object. Give each entry its own id.")
        return obj

    return hook


def load_llamaindex_json(path: str | os.PathLike) -> QADataset:
    """Loads LlamaIndex's ``EmbeddingQAFinetuneDataset.save_json`` output and validates it."""
    path = Path(path)
    try:
        raw = json.loads(_read_text(path), object_pairs_hook=_reject_duplicate_keys(path))
    except json.JSONDecodeError as err:
        raise DataFormatError(
            f"{path}, line {err.lineno}, column {err.colno}: malformed JSON ({err.msg}). Fix the file or "
            "regenerate it with LlamaIndex's generate_qa_embedding_pairs."
        ) from None
    if not isinstance(raw, dict):
        raise DataFormatError(
            f"{path}: expected a JSON object with queries/corpus/relevant_docs, got {type(raw).__name__}."
        )
    missing = [key for key in ("queries", "corpus", "relevant_docs") if key not in raw]
    if missing:
        raise DataFormatError(
            f"{path}: missing key(s) {missing}. A LlamaIndex EmbeddingQAFinetuneDataset file has "
            '{"queries": {id: text}, "corpus": {id: text}, "relevant_docs": {query_id: [doc_id, ...]}}.'
        )
    for key in ("queries", "corpus", "relevant_docs"):
        if not isinstance(raw[key], dict):
            raise DataFormatError(f"{path}: '{key}' must be an object mapping ids, got {type(raw[key]).__name__}.")
    mode = raw.get("mode", "text")
    if mode != "text":
        raise DataFormatError(f"{path}: mode {mode!r} is not supported; lit_embed trains on text (mode 'text').")
    relevant_docs = {}
    for qid, doc_ids in raw["relevant_docs"].items():
        if isinstance(doc_ids, str):
            doc_ids = [doc_ids]
        if not isinstance(doc_ids, list):
            raise DataFormatError(f"{path}: relevant_docs[{qid!r}] must be a list of document ids.")
        relevant_docs[str(qid)] = [str(d) for d in doc_ids]
    dataset = QADataset(
        queries={str(k): v for k, v in raw["queries"].items()},
        corpus={str(k): v for k, v in raw["corpus"].items()},
        relevant_docs=relevant_docs,
    )
    return validate(dataset, source=str(path))


def load_jsonl(path: str | os.PathLike) -> QADataset:
    """Loads ``{"query", "positive", "negatives"}`` lines; equal texts share one id."""
    path = Path(path)
    rows = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(
                f"{where}: malformed JSON ({err.msg}, column {err.colno}). Fix or remove the line."
            ) from None
        if not isinstance(row, dict) or "query" not in row or "positive" not in row:
            raise DataFormatError(
                f'{where}: each line must be an object with "query" and "positive" (and optionally "negatives").'
            )
        negatives = row.get("negatives", [])
        if not isinstance(negatives, list):
            raise DataFormatError(f'{where}: "negatives" must be a list of texts.')
        for name, text in [("query", row["query"]), ("positive", row["positive"])] + [
            (f"negatives[{i}]", t) for i, t in enumerate(negatives)
        ]:
            if not isinstance(text, str) or not text.strip():
                raise DataFormatError(f"{where}: {name} is empty or not a string. Remove the line or fill in the text.")
        rows.append((f"line {lineno}", row["query"], row["positive"], negatives))
    return validate(rows_to_dataset(rows), source=str(path))


def rows_to_dataset(rows: Iterable[tuple[str, str, str, Sequence[str]]]) -> QADataset:
    """Builds a dataset from ``(row id, query, positive, negatives)`` rows, as the ``.jsonl`` loader does.

    Equal texts share one id: a query's id is the id of the row where it first appears, documents are numbered
    ``d0, d1, ...`` in order of appearance. A query that appears on several rows gets every row's positive.
    """
    queries: dict[str, str] = {}
    corpus: dict[str, str] = {}
    relevant_docs: dict[str, list[str]] = {}
    hard_negatives: dict[str, list[str]] = {}
    query_ids: dict[str, str] = {}
    doc_ids: dict[str, str] = {}

    def doc_id(text: str) -> str:
        if text not in doc_ids:
            doc_ids[text] = f"d{len(doc_ids)}"
            corpus[doc_ids[text]] = text
        return doc_ids[text]

    for row_id, query, positive, negatives in rows:
        qid = query_ids.setdefault(query, row_id)
        queries[qid] = query
        if doc_id(positive) not in relevant_docs.setdefault(qid, []):
            relevant_docs[qid].append(doc_id(positive))
        for text in negatives:
            if doc_id(text) not in hard_negatives.setdefault(qid, []):
                hard_negatives[qid].append(doc_id(text))
    return QADataset(queries, corpus, relevant_docs, {q: n for q, n in hard_negatives.items() if n})


def validate(dataset: QADataset, source: str) -> QADataset:
    """Checks ids and texts; returns the dataset or raises a :class:`DataFormatError` naming the culprit.

    Nothing is dropped silently: anything that would make a query or document unusable is an error.
    """
    for kind, texts in (("query", dataset.queries), ("document", dataset.corpus)):
        for key, text in texts.items():
            if not isinstance(text, str):
                raise DataFormatError(f"{source}: {kind} {key!r} is {type(text).__name__}, expected a string.")
            if not text.strip():
                raise DataFormatError(f"{source}: {kind} {key!r} has empty text. Remove it or fill in the text.")
    for qid, doc_ids in dataset.relevant_docs.items():
        if qid not in dataset.queries:
            raise DataFormatError(
                f"{source}: relevant_docs names query {qid!r}, which is not in 'queries'. "
                "Add the query or drop the entry."
            )
        for doc_id in doc_ids + dataset.hard_negatives.get(qid, []):
            if doc_id not in dataset.corpus:
                raise DataFormatError(
                    f"{source}: query {qid!r} names document {doc_id!r}, which is not in 'corpus'. "
                    "Add the document to the corpus or remove the id."
                )
    unanswered = [qid for qid in dataset.queries if not dataset.relevant_docs.get(qid)]
    if unanswered:
        raise DataFormatError(
            f"{source}: {len(unanswered)} of {len(dataset.queries)} queries have no relevant document "
            f"(first: {unanswered[0]!r}). Add their relevant_docs entries or remove those queries."
        )
    return dataset


def training_examples(dataset: QADataset, use_all_docs: bool = False) -> list[TrainingExample]:
    """Flattens a dataset into (query, positive, negatives) rows.

    Args:
        dataset: the validated dataset.
        use_all_docs: False (LlamaIndex's default) = one row per query with its first relevant document;
            True = one row per (query, relevant document).
    """
    examples = []
    for qid, doc_ids in dataset.relevant_docs.items():
        negatives = tuple(dataset.corpus[d] for d in dataset.hard_negatives.get(qid, []))
        for doc_id in doc_ids if use_all_docs else doc_ids[:1]:
            examples.append(TrainingExample(dataset.queries[qid], dataset.corpus[doc_id], negatives, qid))
    return examples


def save_llamaindex_json(dataset: QADataset, path: str | os.PathLike) -> None:
    """Writes the dataset as LlamaIndex's ``EmbeddingQAFinetuneDataset`` JSON (atomically)."""
    payload: dict[str, Any] = {
        "queries": dataset.queries,
        "corpus": dataset.corpus,
        "relevant_docs": dataset.relevant_docs,
        "mode": "text",
    }
    write_text_atomic(path, json.dumps(payload, indent=4, ensure_ascii=False))


def save_jsonl(examples: list[TrainingExample], path: str | os.PathLike) -> None:
    """Writes training rows as ``{"query", "positive", "negatives"}`` JSONL (atomically)."""
    lines = (
        json.dumps({"query": e.query, "positive": e.positive, "negatives": list(e.negatives)}, ensure_ascii=False)
        for e in examples
    )
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes a file via a temporary sibling and a rename, so a crash never leaves half a file."""
    with open_atomic(path) as f:
        f.write(text)
