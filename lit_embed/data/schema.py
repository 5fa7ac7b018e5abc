"""The one in-memory shape of retrieval data, its checks, and the rows a batch is built from.

Every reader (``json_files``, ``tables``, the stdlib builder) produces a :class:`QADataset` and validates it here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lit_embed.errors import DataFormatError


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


def read_text(path: Path) -> str:
    """The file's text as UTF-8 (a leading byte-order mark removed), or an error naming the first bad line."""
    try:
        # Windows tools and spreadsheet exports start files with a byte-order mark; it is not part of the data.
        return path.read_text(encoding="utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataFormatError(
            f"{path}, line {line}: the file is not valid UTF-8 (byte offset {err.start}). "
            "Re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8`."
        ) from None
