"""LlamaIndex's JSON and query/positive/negatives JSONL: reading (validated) and writing (atomic).

* ``.json``: LlamaIndex's ``EmbeddingQAFinetuneDataset``
  ``{"queries": {qid: text}, "corpus": {doc_id: text}, "relevant_docs": {qid: [doc_id, ...]}, "mode": "text"}``,
  as ``generate_qa_embedding_pairs(...).save_json(...)`` writes it.
* ``.jsonl``: one ``{"query": ..., "positive": ..., "negatives": [...]}`` object per line (negatives optional),
  optionally with ``"scores": [s_pos, s_neg1, ...]``, a teacher's score of the positive and of each negative.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lit_embed.data.schema import (
    DEFAULT_POLICY,
    FIX,
    QADataset,
    Record,
    Skipped,
    SkipPolicy,
    TrainingExample,
    read_text,
    rows_to_dataset,
    text_lines,
    validate,
)
from lit_embed.errors import DataFormatError
from lit_embed.files import write_text_atomic


def _reject_duplicate_keys(path: Path):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            dup = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise DataFormatError(f"{path}: id {dup!r} appears twice in one object. Give each entry its own id.")
        return obj

    return hook


def load_llamaindex_json(path: str | os.PathLike, policy: SkipPolicy = DEFAULT_POLICY) -> QADataset:
    """Loads LlamaIndex's ``EmbeddingQAFinetuneDataset.save_json`` output and validates it (see ``validate``)."""
    path = Path(path)
    try:
        raw = json.loads(read_text(path), object_pairs_hook=_reject_duplicate_keys(path))
    except json.JSONDecodeError as err:
        raise DataFormatError(
            f"{path}, line {err.lineno}, column {err.colno}: malformed JSON ({err.msg}). Fix the file or "
            "regenerate it with LlamaIndex's generate_qa_embedding_pairs."
        ) from None
    except RecursionError:
        raise DataFormatError(f"{path}: JSON nested too deeply to be a dataset. Check what wrote the file.") from None
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
    return validate(dataset, str(path), policy)


def json_lines(path: Path) -> Iterator[tuple[int, str, Any]]:
    """``(line number, "FILE, line N", parsed value)`` for each non-blank line, read one line at a time; a bad line
    is one error naming it."""
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            yield lineno, where, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(
                f"{where}: malformed JSON ({err.msg}, column {err.colno}). Fix or remove the line."
            ) from None
        except RecursionError:
            raise DataFormatError(f"{where}: JSON nested too deeply to be a record. Fix or remove the line.") from None


def load_jsonl(path: str | os.PathLike, policy: SkipPolicy = DEFAULT_POLICY) -> QADataset:
    """Loads ``{"query", "positive", "negatives"}`` lines; equal texts share one id.

    A line with an empty query or positive is skipped, and so is an empty negative, within ``policy``; so is a line
    whose teacher ``"scores"`` are not all finite. Scores of the wrong length or type are an error.
    """
    skipped = Skipped()
    return validate(rows_to_dataset(jsonl_records(path, skipped)), str(path), policy, skipped)


def jsonl_records(path: str | os.PathLike, skipped: Skipped) -> Iterator[Record]:
    """The usable records of a ``.jsonl`` file, one line at a time; what is left out goes into ``skipped``."""
    path = Path(path)
    for lineno, where, row in json_lines(path):
        skipped.records += 1
        if not isinstance(row, dict) or "query" not in row or "positive" not in row:
            raise DataFormatError(
                f'{where}: each line must be an object with "query" and "positive" (and optionally "negatives").'
            )
        negatives = row.get("negatives") or []
        if not isinstance(negatives, list):
            raise DataFormatError(f'{where}: "negatives" must be a list of texts.')
        texts = {name: row[name] for name in ("query", "positive")} | {
            f"negatives[{i}]": t for i, t in enumerate(negatives)
        }
        for name, text in texts.items():
            if text is not None and not isinstance(text, str):
                raise DataFormatError(f"{where}: {name} is {type(text).__name__}, expected a text (a JSON string).")
        empty = [name for name, text in texts.items() if text is None or not text.strip()]
        for name in empty:
            message = f"{where}: {name} is empty. Remove the line or fill in the text."
            skipped.add("empty_text", f"line {lineno} ({name})", message, f"line {lineno}")
        scores = _scores(row, len(negatives), where)
        if scores is not None and not all(math.isfinite(s) for s in scores):
            message = f"{where}: the teacher scores {scores} are not all finite numbers. {FIX['nonfinite_score']}"
            skipped.add("nonfinite_score", f"line {lineno}", message, f"line {lineno}")
            continue
        if "query" in empty or "positive" in empty:
            continue
        kept = [i for i, t in enumerate(negatives) if t and t.strip()]
        if scores is not None:
            scores = [scores[0], *(scores[1 + i] for i in kept)]
        yield f"line {lineno}", row["query"], row["positive"], [negatives[i] for i in kept], scores


def _scores(row: dict[str, Any], num_negatives: int, where: str) -> list[float] | None:
    """The line's teacher scores, one for its positive and one per negative, or None when it has none."""
    scores = row.get("scores")
    if scores is None:
        return None
    numbers = isinstance(scores, list) and all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)
    if not numbers or len(scores) != 1 + num_negatives:
        raise DataFormatError(
            f'{where}: "scores" must be a list of {1 + num_negatives} numbers (the positive\'s, then one per '
            f"negative), got {scores!r}. Score the file again with lit-embed-score."
        )
    return [float(s) for s in scores]


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
    """Writes training rows as ``{"query", "positive", "negatives"}`` JSONL (atomically), with their ``"scores"``."""
    lines = (json.dumps(_jsonl_row(e), ensure_ascii=False) for e in examples)
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def _jsonl_row(example: TrainingExample) -> dict[str, Any]:
    row: dict[str, Any] = {"query": example.query, "positive": example.positive, "negatives": list(example.negatives)}
    if example.scores is not None:
        row["scores"] = list(example.scores)
    return row
