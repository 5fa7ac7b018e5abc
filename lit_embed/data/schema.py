"""The one in-memory shape of retrieval data, its checks, and the rows a batch is built from.

Every reader (``json_files``, ``tables``, the stdlib builder) produces a :class:`QADataset` and validates it here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_embed.errors import DataFormatError

log = logging.getLogger(__name__)


@dataclass
class QADataset:
    """Queries, documents and which documents answer which query.

    Attributes:
        queries: query id -> query text.
        corpus: document id -> document text.
        relevant_docs: query id -> ids of the documents that answer it (at least one each).
        hard_negatives: query id -> ids of documents known NOT to answer it (optional).
        skipped: the records of the file that were wrong on their own and left out (None: none were).
        teacher_scores: query id -> document id -> a teacher's score of that pair (``lit-embed-score``), for
            the distillation losses (optional).
    """

    queries: dict[str, str]
    corpus: dict[str, str]
    relevant_docs: dict[str, list[str]]
    hard_negatives: dict[str, list[str]] = field(default_factory=dict)
    skipped: Skipped | None = field(default=None, compare=False)  # what the reader left out of the file
    teacher_scores: dict[str, dict[str, float]] = field(default_factory=dict)


# One pair as a row format holds it: (row id such as "line 3", query, positive, negatives, a teacher's scores of the
# positive and of each negative or None).
Record = tuple[str, str, str, Sequence[str], Sequence[float] | None]


@dataclass(frozen=True)
class TrainingExample:
    """One row of a contrastive batch: a query, the document that answers it, and optional hard negatives."""

    query: str
    positive: str
    negatives: tuple[str, ...] = ()
    query_id: str = field(default="", compare=False)  # where the row came from, for error messages
    scores: tuple[float, ...] | None = None  # a teacher's scores of the positive, then of each negative
    other_positives: tuple[str, ...] = ()  # the query's further relevant documents, when a row holds them all

    def texts(self) -> tuple[str, ...]:
        return (self.query, self.positive, *self.negatives, *self.other_positives)


def rows_to_dataset(rows: Iterable[tuple[str, str, str, Sequence[str]] | tuple[Any, ...]]) -> QADataset:
    """Builds a dataset from ``(row id, query, positive, negatives)`` rows, as the ``.jsonl`` loader does.

    Equal texts share one id: a query's id is the id of the row where it first appears, documents are numbered
    ``d0, d1, ...`` in order of appearance. A query that appears on several rows gets every row's positive. A row
    may end with a teacher's scores of its positive and negatives (or None), kept in ``teacher_scores``.
    """
    queries: dict[str, str] = {}
    corpus: dict[str, str] = {}
    relevant_docs: dict[str, list[str]] = {}
    hard_negatives: dict[str, list[str]] = {}
    query_ids: dict[str, str] = {}
    doc_ids: dict[str, str] = {}
    teacher_scores: dict[str, dict[str, float]] = {}

    def doc_id(text: str) -> str:
        if text not in doc_ids:
            doc_ids[text] = f"d{len(doc_ids)}"
            corpus[doc_ids[text]] = text
        return doc_ids[text]

    for row_id, query, positive, negatives, *scores in rows:
        qid = query_ids.setdefault(query, row_id)
        if scores and scores[0] is not None:
            pairs = zip((positive, *negatives), scores[0], strict=True)
            teacher_scores.setdefault(qid, {}).update((doc_id(text), float(score)) for text, score in pairs)
        queries[qid] = query
        if doc_id(positive) not in relevant_docs.setdefault(qid, []):
            relevant_docs[qid].append(doc_id(positive))
        for text in negatives:
            if doc_id(text) not in hard_negatives.setdefault(qid, []):
                hard_negatives[qid].append(doc_id(text))
    negatives_by_query = {q: n for q, n in hard_negatives.items() if n}
    return QADataset(queries, corpus, relevant_docs, negatives_by_query, teacher_scores=teacher_scores)


# What can be wrong in a record on its own (each one a problem, left out), by kind: what the warning and metrics.json
# call them.
SKIP_KINDS = {
    "empty_text": "empty texts",
    "unknown_query": "relevant_docs entries for a query not in 'queries'",
    "unknown_document": "ids of documents not in 'corpus'",
    "negative_is_positive": "hard negatives equal to a positive of their query",
    "unanswered": "queries without a relevant document",
    "nonfinite_score": "teacher scores that are not finite numbers",
}


@dataclass(frozen=True)
class SkipPolicy:
    """How many records that are wrong on their own a file may hold before it is refused.

    Attributes:
        max_skipped: a fraction of the records below 1 (0.01 = 1%), or a whole number of records.
        strict: refuse any such record (each is an error, as before skipping existed).
    """

    max_skipped: float | int = 0.01
    strict: bool = False

    def allows(self, wrong_records: int, records: int) -> bool:
        if self.strict:
            return wrong_records == 0
        limit = self.max_skipped * records if self.max_skipped < 1 else self.max_skipped
        return wrong_records <= limit

    def describe(self) -> str:
        if self.strict:
            return "data.strict=true refuses any"
        if self.max_skipped < 1:
            return (
                f"more than data.max_skipped={self.max_skipped:g} ({self.max_skipped * 100:g}% of the records) allows"
            )
        return f"more than data.max_skipped={self.max_skipped} records allows"


@dataclass
class Skipped:
    """What a reader left out of a file, and why: two counts of different things, kept apart.

    A *problem* is one thing left out (an empty text, an unknown id, a query without a relevant document ...), listed
    by kind in ``ids``; a *record* is a unit of the file (a query or a document of LlamaIndex JSON, a line, a row),
    of which ``records`` are in the file and ``wrong_records`` hold at least one problem. One record can hold several
    problems (a query naming three documents the corpus lacks), so problems are never counted against records.
    """

    records: int = 0  # how many records the file holds: queries + documents, or lines / rows
    ids: dict[str, list[str]] = field(default_factory=dict)  # kind -> what was left out, in file order
    first_error: str = ""  # the first culprit's own message, its file named: what a refusal reports first
    wrong_records: dict[str, int] = field(default_factory=dict)  # record -> how many problems it holds, in file order

    def add(self, kind: str, item: str, message: str, record: str) -> None:
        """One problem of ``kind``: ``item`` names what is left out, ``record`` the record it is in."""
        self.ids.setdefault(kind, []).append(item)
        self.wrong_records[record] = self.wrong_records.get(record, 0) + 1
        self.first_error = self.first_error or message

    @property
    def count(self) -> int:
        """How many problems: things left out, of every kind."""
        return sum(len(ids) for ids in self.ids.values())

    def summary(self) -> str:
        """``empty texts: 1 (document 'd3'); queries without a relevant document: 2 ('q1', 'q2')``."""
        parts = []
        for kind, ids in self.ids.items():
            shown = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
            parts.append(f"{SKIP_KINDS[kind]}: {len(ids)} ({shown})")
        return "; ".join(parts)

    def counted(self) -> str:
        """``6 problems in 3 of 120 records that are wrong on their own (...)``: problems and records apart."""
        problems = f"{self.count} problem{'' if self.count == 1 else 's'}"
        return (
            f"{problems} in {len(self.wrong_records)} of {self.records} records that are wrong on their own "
            f"({self.summary()})"
        )

    def as_dict(self) -> dict[str, Any]:
        """For metrics.json: the file's records, how many are wrong, how many problems, and per kind the first ids."""
        kinds = {kind: {"count": len(ids), "first": ids[:10]} for kind, ids in self.ids.items()}
        return {"records": self.records, "wrong_records": len(self.wrong_records), "problems": self.count, **kinds}


DEFAULT_POLICY = SkipPolicy()

# What the user can do about each kind, after the message that names the culprit.
FIX = {
    "empty_text": "Remove it or fill in the text.",
    "unknown_query": "Add the query or drop the entry.",
    "unknown_document": "Add the document to the corpus or remove the id.",
    "negative_is_positive": "Remove it from the negatives.",
    "unanswered": "Add their relevant_docs entries or remove those queries.",
    "nonfinite_score": "Score the file again (lit-embed-score) or remove the line.",
}


def validate(
    dataset: QADataset, source: str, policy: SkipPolicy = DEFAULT_POLICY, skipped: Skipped | None = None
) -> QADataset:
    """Leaves out the records that are wrong on their own, and refuses the file when they are too many.

    A record wrong on its own (an empty text, an id naming nothing, a query left without a relevant document, a hard
    negative equal to a positive) is skipped with one warning, as long as ``policy`` allows that many; otherwise, or
    with ``policy.strict``, it is a :class:`DataFormatError` naming the first culprit. A text that is not a string
    is a problem of the whole file's shape and always an error.

    Args:
        dataset: the records as read; not modified.
        source: the file, for messages.
        policy: how many wrong records are allowed.
        skipped: what the reader already left out (lines or rows), with its record count; None for a reader of
            ids (LlamaIndex JSON), whose records are its queries and documents (and relevant_docs entries for a
            query not in 'queries').

    Returns:
        A new dataset of the usable records; its ``skipped`` says what was left out.
    """
    of_ids = skipped is None
    if skipped is None:
        # A relevant_docs entry for a query not in 'queries' is a record of the file too (a wrong one).
        skipped = Skipped(records=len(dataset.queries.keys() | dataset.relevant_docs.keys()) + len(dataset.corpus))

    def record(qid: str) -> str:
        """The record a query's problems are in: the query, or the line (row) a row format gave it its id from."""
        return f"query {qid!r}" if of_ids else qid

    queries = _texts(dataset.queries, "query", source, skipped)
    corpus = _texts(dataset.corpus, "document", source, skipped)

    def known_documents(qid: str, doc_ids: list[str]) -> list[str]:
        for doc_id in doc_ids:
            if doc_id not in dataset.corpus:  # an empty document is skipped already, not unknown
                where = f"{source}: query {qid!r} names document {doc_id!r}, which is not in 'corpus'."
                message = f"{where} {FIX['unknown_document']}"
                skipped.add("unknown_document", f"{doc_id!r} (query {qid!r})", message, record(qid))
        return [d for d in dict.fromkeys(doc_ids) if d in corpus]

    relevant_docs = {}
    for qid, doc_ids in dataset.relevant_docs.items():
        if qid not in dataset.queries:
            where = f"{source}: relevant_docs names query {qid!r}, which is not in 'queries'."
            skipped.add("unknown_query", repr(qid), f"{where} {FIX['unknown_query']}", record(qid))
        elif qid in queries:
            relevant_docs[qid] = known_documents(qid, doc_ids)
    hard_negatives = {}
    for qid, doc_ids in dataset.hard_negatives.items():
        if qid not in relevant_docs:
            continue
        positives = {corpus[d].strip() for d in relevant_docs[qid]}
        for doc_id in known_documents(qid, doc_ids):
            if corpus[doc_id].strip() in positives:  # training on it would push the query away from its answer
                where = f"{source}: query {qid!r} has document {doc_id!r} as a hard negative with a positive's text."
                message = f"{where} {FIX['negative_is_positive']}"
                skipped.add("negative_is_positive", f"{doc_id!r} (query {qid!r})", message, record(qid))
            else:
                hard_negatives.setdefault(qid, []).append(doc_id)
    unanswered = [qid for qid in queries if not relevant_docs.get(qid)]
    for qid in unanswered:
        where = f"{source}: {len(unanswered)} of {len(queries)} queries have no relevant document"
        skipped.add("unanswered", repr(qid), f"{where} (first: {unanswered[0]!r}). {FIX['unanswered']}", record(qid))
    if skipped.count:
        allow_or_refuse(skipped, source, policy)
    return QADataset(
        queries={qid: text for qid, text in queries.items() if relevant_docs.get(qid)},
        corpus=corpus,  # documents no query names stay: they are distractors in evaluation
        relevant_docs={qid: ids for qid, ids in relevant_docs.items() if ids},
        hard_negatives=hard_negatives,
        skipped=skipped if skipped.count else None,
        teacher_scores=dataset.teacher_scores,
    )


def _texts(records: dict[str, Any], kind: str, source: str, skipped: Skipped) -> dict[str, str]:
    """The records whose text is usable; a missing or blank text is skipped, a non-text is an error."""
    usable = {}
    for key, text in records.items():
        if text is not None and not isinstance(text, str):
            raise DataFormatError(f"{source}: {kind} {key!r} is {type(text).__name__}, expected a string.")
        if text is None or not text.strip():
            item = f"{kind} {key!r}"  # only a reader of ids gets here (row readers leave empty texts out): a record
            skipped.add("empty_text", item, f"{source}: {item} has empty text. {FIX['empty_text']}", item)
        else:
            usable[key] = text
    return usable


def allow_or_refuse(skipped: Skipped, source: str, policy: SkipPolicy) -> None:
    """One warning for what is skipped, or one error when the policy allows fewer wrong records."""
    if not policy.allows(len(skipped.wrong_records), skipped.records):
        other_way = "set data.strict=false to skip a few" if policy.strict else "raise data.max_skipped to skip them"
        raise DataFormatError(
            f"{skipped.first_error}\n{skipped.counted()}: {policy.describe()}. Fix them, or {other_way}."
        )
    log.warning("%s: skipped %s. data.strict=true refuses them instead.", source, skipped.counted())


def training_examples(
    dataset: QADataset, use_all_docs: bool = False, multi_positive: bool = False
) -> list[TrainingExample]:
    """Flattens a dataset into (query, positive, negatives) rows.

    Args:
        dataset: the validated dataset.
        use_all_docs: False (LlamaIndex's default) = one row per query with its first relevant document;
            True = one row per (query, relevant document).
        multi_positive: one row per query holding every relevant document (the first as ``positive``, the rest
            as ``other_positives``), whatever ``use_all_docs`` says; a teacher's scores are not carried.
    """
    examples = []
    for qid, doc_ids in dataset.relevant_docs.items():
        negative_ids = dataset.hard_negatives.get(qid, [])
        negatives = tuple(dataset.corpus[d] for d in negative_ids)
        scored = dataset.teacher_scores.get(qid, {})
        if multi_positive:
            others = tuple(dataset.corpus[d] for d in doc_ids[1:])
            examples.append(
                TrainingExample(dataset.queries[qid], dataset.corpus[doc_ids[0]], negatives, qid, None, others)
            )
            continue
        for doc_id in doc_ids if use_all_docs else doc_ids[:1]:
            scores = None
            if all(d in scored for d in (doc_id, *negative_ids)):
                scores = tuple(scored[d] for d in (doc_id, *negative_ids))
            examples.append(TrainingExample(dataset.queries[qid], dataset.corpus[doc_id], negatives, qid, scores))
    return examples


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 file, read one line at a time (a leading byte-order mark removed); a line
    that is not UTF-8 is an error naming it, as :func:`read_text`'s."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(
                    f"{path}, line {lineno}: the file is not valid UTF-8 (byte offset {offset + err.start}). "
                    "Re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8`."
                ) from None
            offset += len(raw)
            yield lineno, line.removeprefix("\ufeff") if lineno == 1 else line


def queries_subset(dataset: QADataset, query_ids: Iterable[str]) -> QADataset:
    """These queries, with the documents relevant to them as the corpus (an evaluation set of their own)."""
    relevant = {q: dataset.relevant_docs[q] for q in query_ids}
    corpus = {d: dataset.corpus[d] for docs in relevant.values() for d in docs}
    return QADataset({q: dataset.queries[q] for q in relevant}, corpus, relevant)


# Fewer queries than this keep no validation slice: it would measure little and cost the training a lot.
MIN_QUERIES_TO_HOLD_OUT = 200
# Enough queries to tell models apart; more would only slow every evaluation.
MAX_HELD_OUT_QUERIES = 1000


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
