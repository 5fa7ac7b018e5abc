"""Questions not worth training on, dropped and counted: too short, copied from the chunk, asked of several chunks,
or (optional) not leading the base model back to their chunk.

Each filter keeps the ids of the questions it keeps, so a filtered dataset's ids are those of the unfiltered one.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import TYPE_CHECKING

from lit_embed.data.schema import QADataset

if TYPE_CHECKING:  # the module itself imports torch, which only the round trip needs
    from lit_embed.evaluation.retrieval import TextEncoder

TOO_SHORT = "too short"
COPIED = "copied from the chunk"
SEVERAL_CHUNKS = "asked of several chunks"
ROUND_TRIP = "chunk not in the base model's top k"


def drop_weak_questions(dataset: QADataset, min_words: int = 3) -> tuple[QADataset, dict[str, int]]:
    """The dataset without its weak questions, and how many of each kind were dropped (each counted once).

    * too short: fewer than ``min_words`` words;
    * copied from the chunk: its words, in order, are a passage of its chunk (a sentence with a "?" put on);
    * asked of several chunks: the same words were generated for another chunk too, so which chunk answers it is
      a guess; every copy goes, since a training pair would teach that one of them does and the other does not.
    """
    chunk_words = {doc_id: f" {_words(text)} " for doc_id, text in dataset.corpus.items()}
    asked_of: dict[str, set[str]] = defaultdict(set)
    for query_id, question in dataset.queries.items():
        asked_of[_words(question)].update(dataset.relevant_docs[query_id])
    dropped = {TOO_SHORT: 0, COPIED: 0, SEVERAL_CHUNKS: 0}
    kept = []
    for query_id, question in dataset.queries.items():
        words = _words(question)
        if len(words.split()) < min_words:
            dropped[TOO_SHORT] += 1
        elif any(f" {words} " in chunk_words[doc_id] for doc_id in dataset.relevant_docs[query_id]):
            dropped[COPIED] += 1
        elif len(asked_of[words]) > 1:
            dropped[SEVERAL_CHUNKS] += 1
        else:
            kept.append(query_id)
    return with_queries(dataset, kept), dropped


def round_trip(
    dataset: QADataset, encoder: TextEncoder, top_k: int, batch_size: int = 64
) -> tuple[QADataset, dict[str, int]]:
    """Keeps a question only if ``encoder`` (the base model) ranks its chunk among the ``top_k`` of the whole corpus:
    a question it cannot tell from other chunks' questions is vague ("What does the text describe?") or answered
    elsewhere too."""
    # torch only here: generating questions needs none of it.
    import torch

    from lit_embed.evaluation.ir import exact_search
    from lit_embed.evaluation.retrieval import encode_texts

    if not dataset.queries:
        return dataset, {ROUND_TRIP: 0}
    doc_ids = list(dataset.corpus)
    row_of = {doc_id: row for row, doc_id in enumerate(doc_ids)}
    query_ids = list(dataset.queries)
    with torch.no_grad():
        queries = encode_texts(encoder, [dataset.queries[q] for q in query_ids], "query", batch_size)  # [Q, D]
        documents = encode_texts(encoder, [dataset.corpus[d] for d in doc_ids], "document", batch_size)  # [C, D]
        _, hits = exact_search(queries, documents.to(queries.device), top_k)  # [Q, min(top_k, C)]
    kept = [
        query_id
        for query_id, top in zip(query_ids, hits.tolist(), strict=True)
        if any(row_of[doc_id] in top for doc_id in dataset.relevant_docs[query_id])
    ]
    return with_queries(dataset, kept), {ROUND_TRIP: len(query_ids) - len(kept)}


def with_queries(dataset: QADataset, query_ids: list[str]) -> QADataset:
    """The dataset with only these queries; the corpus stays whole (chunks without questions are distractors)."""
    return QADataset(
        queries={q: dataset.queries[q] for q in query_ids},
        corpus=dataset.corpus,
        relevant_docs={q: dataset.relevant_docs[q] for q in query_ids},
    )


def _words(text: str) -> str:
    """Lower-case words only, so that case, punctuation and spacing do not hide a copy."""
    return " ".join(re.findall(r"\w+", text.casefold()))
