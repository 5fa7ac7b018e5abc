"""Training rows as integer arrays over the distinct texts, converted once from the input and kept on disk.

A row is a query, its positive, its hard negatives and (``multi_positive``) its further positives, each the id of a
distinct text; every distinct text is stored once, as UTF-8 (:class:`~lit_embed.data.ragged.Ragged`). Row formats
(JSONL, CSV, Parquet, ``datasets`` directories) are converted in one pass over their records: equal texts are
found by a 128-bit hash of each, so memory holds one hash per distinct text and a few integers per row, never the
texts. The rows are the ones :func:`~lit_embed.data.schema.training_examples` builds from the loaded file, in the
same order (``tests/test_rows.py`` checks it): a query on several lines gets every line's positive and negatives,
a hard negative with a positive's text is skipped, later teacher scores of a pair replace earlier ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
from array import array
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lit_embed.data.ragged import Ragged, RaggedWriter
from lit_embed.data.schema import (
    FIX,
    MAX_HELD_OUT_QUERIES,
    MIN_QUERIES_TO_HOLD_OUT,
    QADataset,
    Record,
    Skipped,
    SkipPolicy,
    TrainingExample,
    allow_or_refuse,
    training_examples,
)

log = logging.getLogger(__name__)

ROWS_FORMAT = 3  # part of every rows store's key: a change of what is stored gives new stores


@dataclass(frozen=True)
class TrainingRows:
    """The training rows of one data file.

    Attributes:
        queries: the distinct query texts.
        documents: the distinct document texts.
        query: ``[R]`` each row's query.
        positive: ``[R]`` each row's positive document.
        negatives: ``[R]`` rows of hard-negative documents.
        other_positives: ``[R]`` rows of further positives (``multi_positive``; empty rows otherwise).
        scores: ``[R]`` rows of a teacher's scores, the positive's then each negative's; None unless every row has
            them.
        query_ids: ``[R]`` each row's query id (UTF-8), for messages.
        relevant: ``[Q]`` each distinct query's relevant documents, all of them (a row may train on one only): what
            a validation slice held out of the rows, or mining, counts as relevant.
        key: what the rows were built from (file content and settings): the store's name and part of the token
            stores' keys.
        skipped: the records left out as wrong on their own.
    """

    queries: Ragged
    documents: Ragged
    query: np.ndarray
    positive: np.ndarray
    negatives: Ragged
    other_positives: Ragged
    scores: Ragged | None
    query_ids: Ragged
    relevant: Ragged
    key: str
    skipped: Skipped | None = None

    def __len__(self) -> int:
        return len(self.query)

    def trimmed(self, max_negatives: int | None) -> TrainingRows:
        """Each row's first ``max_negatives`` hard negatives, and their scores (None: all of them, these rows)."""
        if max_negatives is None:
            return self
        scores = self.scores.head(1 + max_negatives) if self.scores is not None else None
        return replace(self, negatives=self.negatives.head(max_negatives), scores=scores)

    def subset(self, rows: np.ndarray) -> TrainingRows:
        """These rows, in this order (the texts stay: every id keeps its meaning)."""
        scores = self.scores.take(rows) if self.scores is not None else None
        return replace(
            self,
            query=self.query[rows],
            positive=self.positive[rows],
            negatives=self.negatives.take(rows),
            other_positives=self.other_positives.take(rows),
            scores=scores,
            query_ids=self.query_ids.take(rows),
        )

    def with_query_negatives(self, negatives: Ragged) -> TrainingRows:
        """Every row's hard negatives replaced by its query's (``[Q]``, e.g. mined); teacher scores, which were for
        the old ones, are dropped."""
        return replace(self, negatives=negatives.take(self.query), scores=None)

    def dataset(self, queries: np.ndarray | None = None, every_document: bool | None = None) -> QADataset:
        """These distinct queries (default: all) with their relevant documents as a :class:`QADataset` in memory;
        its corpus is every document when all queries are asked for (or ``every_document``), theirs otherwise. Ids
        are the numbers of the queries and documents here, so ``dataset.corpus``'s order is the documents'."""
        if every_document is None:
            every_document = queries is None
        if queries is None:
            queries = np.arange(len(self.queries))
        if every_document:
            documents = np.arange(len(self.documents))
        else:
            documents = np.unique(self.relevant.take(queries).values)
        return QADataset(
            queries={str(q): self.queries.text(q) for q in queries.tolist()},
            corpus={str(d): self.documents.text(d) for d in documents.tolist()},
            relevant_docs={str(q): [str(d) for d in self.relevant.row(q).tolist()] for q in queries.tolist()},
        )

    def hold_out(self, fraction: float, seed: int, source: str) -> tuple[TrainingRows, QADataset | None]:
        """Splits a validation set off the rows: ``(train, val)``, or ``(self, None)`` when there are too few queries.

        ``fraction`` of the distinct query texts (at most :data:`MAX_HELD_OUT_QUERIES`), drawn with ``seed``, leave
        training with every row they have; the validation set is them and all their relevant documents. Queries
        with the same text are one query here, so none is trained on under another id. The documents stay in the
        training corpus: where another query has one as positive or negative, it is still trained on.
        """
        num_queries = len(self.queries)
        if num_queries < MIN_QUERIES_TO_HOLD_OUT:
            log.warning(
                "%s: no data.val_path, and only %d distinct queries (fewer than %d) to hold out a validation slice "
                "from: training on all of them without validation, so there is no before/after table, best "
                "checkpoint or weight merging. Pass data.val_path=FILE to have them.",
                source,
                num_queries,
                MIN_QUERIES_TO_HOLD_OUT,
            )
            return self, None
        count = min(MAX_HELD_OUT_QUERIES, max(1, round(fraction * num_queries)))
        held = np.sort(np.random.default_rng(seed).choice(num_queries, count, replace=False))
        is_held = np.zeros(num_queries, dtype=bool)
        is_held[held] = True
        log.info(
            "%s: no data.val_path, so %d of its %d queries (%d%%) are held out as the validation set "
            "(data.val_fraction=0 trains on all of them, without validation).",
            source,
            count,
            num_queries,
            round(100 * count / num_queries),
        )
        return self.subset(np.flatnonzero(~is_held[self.query])), self.dataset(held)

    def row_texts(self) -> Ragged:
        """Each row's text ids, queries and documents in one id space (documents after the queries): what the
        no-duplicates sampler compares. A query equal to a document is no clash; all of a row's positives are in
        it, so none of them is in the batch as another row's document (a negative)."""
        negatives, others = self.negatives.lengths, self.other_positives.lengths
        counts = 2 + negatives + others
        offsets = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        values = np.empty(offsets[-1], dtype=np.int64)
        starts = offsets[:-1]
        base = len(self.queries)
        values[starts] = self.query
        values[starts + 1] = base + self.positive
        for part, first in ((self.negatives, starts + 2), (self.other_positives, starts + 2 + negatives)):
            at = np.repeat(first - part.offsets[:-1], part.lengths) + np.arange(len(part.values))
            values[at] = base + np.asarray(part.values)
        return Ragged(values, offsets)

    def examples(self) -> list[TrainingExample]:
        """The rows as :class:`TrainingExample` objects (texts in memory: for tests and small data)."""
        return [
            TrainingExample(
                self.queries.text(self.query[r]),
                self.documents.text(self.positive[r]),
                tuple(self.documents.texts(self.negatives.row(r))),
                self.query_ids.text(r),
                tuple(self.scores.row(r).tolist()) if self.scores is not None else None,
                tuple(self.documents.texts(self.other_positives.row(r))),
            )
            for r in range(len(self))
        ]

    def save(self, directory: Path) -> None:
        """Writes everything but the texts (written by the builder as it goes) into ``directory``."""
        np.save(directory / "query.npy", self.query)
        np.save(directory / "positive.npy", self.positive)
        scored = ["scores"] if self.scores is not None else []
        for name in ["negatives", "other_positives", "query_ids", "relevant", *scored]:
            getattr(self, name).save(directory, name)
        skipped = self.skipped.__dict__ if self.skipped is not None else None
        (directory / "rows.json").write_text(json.dumps({"key": self.key, "skipped": skipped}))

    @classmethod
    def load(cls, directory: Path) -> TrainingRows:
        """The rows of a store, memory-mapped."""
        meta = json.loads((directory / "rows.json").read_text())
        has_scores = (directory / "scores.values.npy").is_file()
        return cls(
            queries=Ragged.load(directory, "queries"),
            documents=Ragged.load(directory, "documents"),
            query=np.load(directory / "query.npy", mmap_mode="r"),
            positive=np.load(directory / "positive.npy", mmap_mode="r"),
            negatives=Ragged.load(directory, "negatives"),
            other_positives=Ragged.load(directory, "other_positives"),
            scores=Ragged.load(directory, "scores") if has_scores else None,
            query_ids=Ragged.load(directory, "query_ids"),
            relevant=Ragged.load(directory, "relevant"),
            key=meta["key"],
            skipped=Skipped(**meta["skipped"]) if meta["skipped"] else None,
        )


def write_examples(
    dataset: QADataset, directory: Path, key: str, use_all_docs: bool = False, multi_positive: bool = False
) -> None:
    """Stores the rows of a dataset in memory (LlamaIndex JSON, which is read whole, and the stdlib data)."""
    examples = training_examples(dataset, use_all_docs, multi_positive)
    query_row = {text: i for i, text in enumerate(dict.fromkeys(e.query for e in examples))}
    relevant: dict[str, dict[str, None]] = {text: {} for text in query_row}  # query text -> its documents' texts
    for qid, docs in dataset.relevant_docs.items():
        if dataset.queries[qid] in relevant:
            relevant[dataset.queries[qid]].update(dict.fromkeys(dataset.corpus[d] for d in docs))
    # Documents in order of appearance in the rows, then relevant documents no row trains on.
    doc_texts = dict.fromkeys(t for e in examples for t in e.texts()[1:])
    doc_texts.update(dict.fromkeys(t for docs in relevant.values() for t in docs))
    doc_row = {text: i for i, text in enumerate(doc_texts)}
    Ragged.from_texts(query_row).save(directory, "queries")
    Ragged.from_texts(doc_row).save(directory, "documents")
    scored = bool(examples) and all(e.scores is not None for e in examples)
    TrainingRows(
        queries=Ragged.load(directory, "queries"),
        documents=Ragged.load(directory, "documents"),
        query=np.array([query_row[e.query] for e in examples], dtype=np.int64),
        positive=np.array([doc_row[e.positive] for e in examples], dtype=np.int64),
        negatives=Ragged.from_rows([doc_row[t] for t in e.negatives] for e in examples),
        other_positives=Ragged.from_rows([doc_row[t] for t in e.other_positives] for e in examples),
        scores=Ragged.from_rows((e.scores for e in examples), np.float64) if scored else None,
        query_ids=Ragged.from_texts(e.query_id for e in examples),
        relevant=Ragged.from_rows([doc_row[t] for t in docs] for docs in relevant.values()),
        key=key,
        skipped=dataset.skipped,
    ).save(directory)


def write_records(
    records: Iterable[Record],
    directory: Path,
    key: str,
    source: str,
    skipped: Skipped,
    policy: SkipPolicy,
    use_all_docs: bool = False,
    multi_positive: bool = False,
) -> None:
    """Converts a stream of records into a rows store in one pass, then groups the rows by query with numpy.

    Args:
        records: the file's usable records, in file order (its reader leaves out empty texts, into ``skipped``).
        directory: where the store is written.
        key: the store's key.
        source: the file, for messages.
        skipped: what the reader left out, with its record count; hard negatives equal to a positive are added.
        policy: how many skipped records the file may hold.
        use_all_docs: one row per (query, relevant document) instead of per query.
        multi_positive: one row per query with every relevant document.
    """
    texts = {"query": _TextIds(directory, "queries"), "document": _TextIds(directory, "documents")}
    names = RaggedWriter(directory, "names", np.uint8)  # each distinct query's id: its first row's
    row_query, row_positive = array("q"), array("q")
    negatives, negative_counts = array("q"), array("q")
    scored_query, scored_document, scored_value = array("q"), array("q"), array("d")
    for row_id, query, positive, row_negatives, scores in records:
        q = texts["query"].id(query)
        if q == len(names):
            names.append(row_id.encode())
        documents = [texts["document"].id(text) for text in (positive, *row_negatives)]
        row_query.append(q)
        row_positive.append(documents[0])
        negatives.extend(documents[1:])
        negative_counts.append(len(documents) - 1)
        if scores is not None:
            scored_query.extend([q] * len(documents))
            scored_document.extend(documents)
            scored_value.extend(scores)
    num_docs = len(texts["document"])
    strip_hashes = texts["document"].strip_hashes
    for side in texts.values():
        side.close()
    query_names = names.close()
    row_query, row_positive = np.frombuffer(row_query, np.int64), np.frombuffer(row_positive, np.int64)

    # Each query's relevant documents, once each, in order of appearance; queries in order of appearance.
    rel_q, rel_d = _first_pairs(row_query, row_positive, num_docs)
    # Its hard negatives: every line's, once each; in validate's order (queries by their first negative) for the
    # messages, then grouped by query for the rows.
    counts = np.frombuffer(negative_counts, np.int64)
    neg_q, neg_d = _first_pairs(np.repeat(row_query, counts), np.frombuffer(negatives, np.int64), num_docs, False)
    by_first = np.argsort(_first_position(neg_q, len(query_names)), kind="stable")
    neg_q, neg_d = neg_q[by_first], neg_d[by_first]
    # A hard negative with the text of one of its query's positives (stripped) would push the query from its answer.
    equal_to_positive = np.isin(_pair_hash(neg_q, strip_hashes[neg_d]), _pair_hash(rel_q, strip_hashes[rel_d]))
    for q, d in zip(neg_q[equal_to_positive].tolist(), neg_d[equal_to_positive].tolist(), strict=True):
        qid, doc = query_names.text(q), f"d{d}"
        where = f"{source}: query {qid!r} has document {doc!r} as a hard negative with a positive's text."
        message = f"{where} {FIX['negative_is_positive']}"
        skipped.add("negative_is_positive", f"{doc!r} (query {qid!r})", message, qid)  # qid: its first line (row)
    if skipped.count:
        allow_or_refuse(skipped, source, policy)
    keep = ~equal_to_positive
    neg_q, neg_d = neg_q[keep], neg_d[keep]
    grouped = np.argsort(neg_q, kind="stable")
    query_negatives = _grouped(neg_q[grouped], neg_d[grouped], len(query_names))

    if multi_positive:
        first = _group_starts(rel_q)
        rows_q, rows_p = rel_q[first], rel_d[first]
        others = _grouped(rel_q[~first], rel_d[~first], len(query_names)).take(rows_q)
    else:
        chosen = np.ones(len(rel_q), bool) if use_all_docs else _group_starts(rel_q)
        rows_q, rows_p = rel_q[chosen], rel_d[chosen]
        others = Ragged(np.zeros(0, np.int64), np.zeros(len(rows_q) + 1, np.int64))
    row_negatives = query_negatives.take(rows_q)
    scores = None
    if len(scored_query) and not multi_positive:
        scores = _row_scores(
            np.frombuffer(scored_query, np.int64),
            np.frombuffer(scored_document, np.int64),
            np.frombuffer(scored_value, np.float64),
            rows_q,
            rows_p,
            row_negatives,
            num_docs,
        )
    TrainingRows(
        queries=Ragged.load(directory, "queries"),
        documents=Ragged.load(directory, "documents"),
        query=rows_q,
        positive=rows_p,
        negatives=row_negatives,
        other_positives=others,
        scores=scores,
        query_ids=query_names.take(rows_q),
        relevant=_grouped(rel_q, rel_d, len(query_names)),
        key=key,
        skipped=skipped if skipped.count else None,
    ).save(directory)
    for suffix in ("values", "offsets"):
        (directory / f"names.{suffix}.npy").unlink()


class _TextIds:
    """Numbers distinct texts in order of appearance and writes each once; memory holds a hash per text."""

    def __init__(self, directory: Path, name: str) -> None:
        self._ids: dict[bytes, int] = {}
        self._writer = RaggedWriter(directory, name, np.uint8)
        self._strip_hashes = array("Q")

    def __len__(self) -> int:
        return len(self._ids)

    def id(self, text: str) -> int:
        encoded = text.encode()
        digest = hashlib.blake2b(encoded, digest_size=16).digest()
        found = self._ids.get(digest)
        if found is None:
            found = self._ids[digest] = len(self._ids)
            self._writer.append(encoded)
            stripped = hashlib.blake2b(text.strip().encode(), digest_size=8).digest()
            self._strip_hashes.append(int.from_bytes(stripped, "little"))
        return found

    @property
    def strip_hashes(self) -> np.ndarray:
        """``[texts]`` a hash of each text without surrounding white space (validate compares texts so)."""
        return np.frombuffer(self._strip_hashes, dtype=np.uint64)

    def close(self) -> None:
        self._writer.close()
        self._ids.clear()


def _first_pairs(
    left: np.ndarray, right: np.ndarray, num_right: int, grouped: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Each distinct ``(left, right)`` pair once, in order of first appearance, then grouped by ``left`` (stable)."""
    _, first = np.unique(left * num_right + right, return_index=True)
    first.sort()
    left, right = left[first], right[first]
    if not grouped:
        return left, right
    order = np.argsort(left, kind="stable")
    return left[order], right[order]


def _group_starts(groups: np.ndarray) -> np.ndarray:
    """Whether each element of grouped values is its group's first."""
    return np.r_[True, groups[1:] != groups[:-1]][: len(groups)]


def _first_position(groups: np.ndarray, num_groups: int) -> np.ndarray:
    """For each element, the position of the first element of its group (``groups`` in order of appearance)."""
    first = np.full(num_groups, len(groups), dtype=np.int64)
    np.minimum.at(first, groups, np.arange(len(groups)))
    return first[groups]


def _pair_hash(query: np.ndarray, text_hash: np.ndarray) -> np.ndarray:
    return query.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + text_hash


def _grouped(groups: np.ndarray, values: np.ndarray, num_groups: int) -> Ragged:
    """Values already sorted by group, as one row per group (empty rows for groups without any)."""
    offsets = np.zeros(num_groups + 1, dtype=np.int64)
    np.cumsum(np.bincount(groups, minlength=num_groups), out=offsets[1:])
    return Ragged(values, offsets)


def _row_scores(
    query: np.ndarray,
    document: np.ndarray,
    value: np.ndarray,
    rows_q: np.ndarray,
    rows_p: np.ndarray,
    row_negatives: Ragged,
    num_docs: int,
) -> Ragged | None:
    """Each row's teacher scores (positive, then each negative): the last ones given for each pair; None unless
    every row's pairs are all scored."""
    pairs = query * num_docs + document
    keys, last = np.unique(pairs[::-1], return_index=True)  # the reversed array's first is the file's last
    values = value[::-1][last]
    counts = 1 + row_negatives.lengths
    offsets = np.zeros(len(rows_q) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    wanted = np.empty(offsets[-1], dtype=np.int64)
    wanted[offsets[:-1]] = rows_q * num_docs + rows_p
    at = np.repeat(offsets[:-1] + 1 - row_negatives.offsets[:-1], row_negatives.lengths)
    negative_pairs = np.repeat(rows_q, row_negatives.lengths) * num_docs + np.asarray(row_negatives.values)
    wanted[at + np.arange(len(row_negatives.values))] = negative_pairs
    found = np.searchsorted(keys, wanted)
    found = np.minimum(found, len(keys) - 1)
    if not (keys[found] == wanted).all():
        return None
    return Ragged(values[found], offsets)
