"""Retrieval evaluation of an encoder on a validation set (metrics from ``lit_embed.evaluation.ir``)."""

from __future__ import annotations

from lit_embed.data.formats import QADataset
from lit_embed.evaluation.ir import DEFAULT_K, evaluate_embeddings
from lit_embed.models.encoder import Encoder

# The rows of the before/after table printed at the end of a run.
METRIC_TABLE_KEYS = ("mrr@10", "ndcg@10", "map@100", "recall@10", "accuracy@1", "accuracy@5", "accuracy@10")


def evaluate_encoder(
    encoder: Encoder, dataset: QADataset, batch_size: int = 64, corpus_chunk_size: int = 50_000
) -> dict[str, float]:
    """Embeds the queries and the whole corpus with the encoder's prompts and scores exact cosine search."""
    query_ids = list(dataset.queries)
    corpus_ids = list(dataset.corpus)
    queries = encoder.encode([dataset.queries[q] for q in query_ids], "query", batch_size)
    corpus = encoder.encode([dataset.corpus[d] for d in corpus_ids], "document", batch_size)
    return evaluate_embeddings(
        queries,
        corpus,
        query_ids,
        corpus_ids,
        dataset.relevant_docs,
        DEFAULT_K,
        corpus_chunk_size=corpus_chunk_size,
    )
