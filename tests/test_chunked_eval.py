"""Evaluation embeds the corpus in chunks into a memory-mapped array: the same metrics as embedding it whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import toy_split

from lit_embed.evaluation import retrieval
from lit_embed.evaluation.ir import evaluate_and_rank
from lit_embed.evaluation.retrieval import encode_corpus, evaluate_encoder_and_rank


def test_chunked_memory_mapped_corpus_gives_the_in_memory_metrics(tiny_encoder, monkeypatch) -> None:
    data = toy_split(40)
    corpus_ids, query_ids = list(data.corpus), list(data.queries)
    corpus = tiny_encoder.encode([data.corpus[d] for d in corpus_ids], "document")
    queries = tiny_encoder.encode([data.queries[q] for q in query_ids], "query")
    expected, expected_rankings = evaluate_and_rank(queries, corpus, query_ids, corpus_ids, data.relevant_docs)
    monkeypatch.setattr(retrieval, "CORPUS_CHUNK", 7)  # 40 documents in 6 chunks
    metrics, rankings = evaluate_encoder_and_rank(tiny_encoder, data)
    assert metrics == pytest.approx(expected, abs=1e-6)
    assert rankings.tolist() == expected_rankings.tolist()


def mapped_file(address: int) -> str:
    """The file mapped at ``address`` in this process ("" for anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in span.split("-"))
        if start <= address < end:
            return rest[-1] if len(rest) == 5 else ""
    return ""


def test_the_corpus_vectors_live_in_a_memory_mapped_file(tiny_encoder) -> None:
    texts = [f"document number {i}" for i in range(20)]
    vectors = encode_corpus(tiny_encoder, iter(texts), len(texts), "document", 4, chunk_size=6, normalize=True)
    assert "lit_embed-corpus-" in mapped_file(vectors.data_ptr())  # a file's pages, not the heap
    assert np.allclose(np.linalg.norm(vectors.numpy(), axis=1), 1, atol=1e-5)
    direct = tiny_encoder.encode(texts, "document")
    assert np.allclose(vectors.numpy(), (direct / direct.norm(dim=1, keepdim=True)).numpy(), atol=1e-5)
