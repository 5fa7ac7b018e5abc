"""Scoring an encoder's retrieval on a validation set: the one function training, lit-embed-eval and sweeps share.

The metrics themselves are computed in :mod:`lit_embed.evaluation.ir`; this embeds the texts (sharded under
``torch.distributed``), and names the headline metrics.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from lit_embed.data.schema import QADataset
from lit_embed.distributed import all_gather_rows, rank_and_world
from lit_embed.errors import LitEmbedError
from lit_embed.evaluation import DEFAULT_K, METRIC_TABLE_KEYS
from lit_embed.evaluation.ir import evaluate_and_rank


class TextEncoder(Protocol):
    """What evaluation needs from an encoder (:class:`~lit_embed.models.encoder.Encoder` and its stand-ins)."""

    embedding_dim: int
    device: torch.device

    def encode(self, texts: list[str], kind: str, batch_size: int = 64) -> Tensor: ...


def encode_texts(
    encoder: TextEncoder, texts: list[str], kind: str, batch_size: int, truncate_dim: int | None = None
) -> Tensor:
    """``[len(texts), truncate_dim or D]``: the embeddings evaluation scores (bf16 autocast on a GPU)."""
    # bf16 on the GPU halves the evaluation time; the scores are computed in float32 anyway.
    use_bf16 = encoder.device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    with autocast:
        embeddings = encoder.encode(texts, kind, batch_size)  # [n, D]
    # Cut before scoring, which normalizes, as sentence-transformers' truncate_dim does; None keeps all D.
    return embeddings[:, :truncate_dim]  # [n, truncate_dim]


def _encode_sharded(
    encoder: TextEncoder, texts: list[str], kind: str, batch_size: int, truncate_dim: int | None = None
) -> Tensor:
    """Each rank embeds its contiguous share of the texts; the shares are gathered back in the input order."""
    rank, world = rank_and_world()
    share = texts[rank * len(texts) // world : (rank + 1) * len(texts) // world]
    return all_gather_rows(encode_texts(encoder, share, kind, batch_size, truncate_dim))[0]  # [len(texts), D]


def evaluate_encoder(
    encoder: TextEncoder,
    dataset: QADataset,
    batch_size: int = 64,
    corpus_chunk_size: int = 50_000,
    truncate_dim: int | None = None,
) -> dict[str, float]:
    """Embeds the validation queries and corpus with the encoder's prompts and scores exact cosine search.

    Under ``torch.distributed`` each rank embeds its shard of the corpus and of the queries once, searches
    only its own queries against the gathered corpus, and the per-rank means are combined: every rank returns
    the same metrics and no rank repeats the whole evaluation.

    ``truncate_dim`` scores only the first that many dimensions of every embedding (a smaller size of a model
    trained with ``loss=matryoshka``), as sentence-transformers' ``truncate_dim`` does; None scores them all.
    """
    return evaluate_encoder_and_rank(encoder, dataset, batch_size, corpus_chunk_size, truncate_dim)[0]


def evaluate_encoder_and_rank(
    encoder: TextEncoder,
    dataset: QADataset,
    batch_size: int = 64,
    corpus_chunk_size: int = 50_000,
    truncate_dim: int | None = None,
) -> tuple[dict[str, float], Tensor]:
    """:func:`evaluate_encoder`'s metrics and each query's ranking in brief (:func:`~lit_embed.evaluation.ir.
    evaluate_and_rank`): ``[Q, 2]``, one row per query of ``dataset.queries`` in order, the same on every rank."""
    check_truncate_dim(truncate_dim, encoder.embedding_dim)
    rank, world = rank_and_world()
    query_ids = list(dataset.queries)[rank::world]
    corpus_ids = list(dataset.corpus)
    corpus = _encode_sharded(encoder, [dataset.corpus[d] for d in corpus_ids], "document", batch_size, truncate_dim)
    queries = encode_texts(encoder, [dataset.queries[q] for q in query_ids], "query", batch_size, truncate_dim)
    metrics, rankings = evaluate_and_rank(
        queries, corpus, query_ids, corpus_ids, dataset.relevant_docs, DEFAULT_K, corpus_chunk_size=corpus_chunk_size
    )
    if world == 1:
        return metrics, rankings
    # Every query has a relevant document (validated), so each rank's mean is over len(query_ids) queries.
    sums = torch.tensor([v * len(query_ids) for v in metrics.values()] + [len(query_ids)], dtype=torch.float64)
    sums = sums.to(corpus.device)
    dist.all_reduce(sums)
    # Rank r searched queries r, r + world, ...: gathered in rank order, then put back in the dataset's order.
    gathered = all_gather_rows(rankings.to(corpus.device))[0].cpu()  # [Q, 2]
    order = torch.cat([torch.arange(r, len(dataset.queries), world) for r in range(world)])
    in_order = torch.empty_like(gathered)
    in_order[order] = gathered
    return {key: (sums[i] / sums[-1]).item() for i, key in enumerate(metrics)}, in_order


def check_truncate_dim(truncate_dim: int | None, embedding_dim: int) -> None:
    """Raises a ``LitEmbedError`` unless ``truncate_dim`` is None or between 1 and ``embedding_dim``."""
    if truncate_dim is not None and not 1 <= truncate_dim <= embedding_dim:
        raise LitEmbedError(
            f"truncate_dim={truncate_dim} is not a size of this model's {embedding_dim}-dimensional embeddings: set "
            f"eval.truncate_dim (lit-embed-eval --truncate-dim) between 1 and {embedding_dim}, or to null to score "
            "the full embeddings."
        )


def format_metrics_table(metrics: dict[str, dict[str, float]]) -> str:
    """A small table of the headline retrieval metrics, one column per entry, and the last one's change over the
    first when there are several."""
    # metrics.json's other entries ("merge", "skipped") are not columns.
    columns = [name for name, values in metrics.items() if isinstance(values, dict) and METRIC_TABLE_KEYS[0] in values]
    if not columns:
        return "No validation set: nothing to compare."
    lines = [f"{'metric':<14}" + "".join(f"{c:>10}" for c in columns) + (f"{'change':>10}" if len(columns) > 1 else "")]
    for key in METRIC_TABLE_KEYS:
        values = [metrics[c][key] for c in columns]
        change = f"{values[-1] - values[0]:>+10.4f}" if len(values) > 1 else ""
        lines.append(f"{key:<14}" + "".join(f"{v:>10.4f}" for v in values) + change)
    return "\n".join(lines)
