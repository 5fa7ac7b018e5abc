"""Scoring an encoder's retrieval on a validation set: the one function training, lit-embed-eval and sweeps share.

The metrics themselves are computed in :mod:`lit_embed.evaluation.ir`; this embeds the texts (sharded under
``torch.distributed``), and names the headline metrics.
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from lit_embed.data.schema import QADataset
from lit_embed.distributed import all_gather_rows, rank_and_world
from lit_embed.errors import LitEmbedError
from lit_embed.evaluation import DEFAULT_K, METRIC_TABLE_KEYS
from lit_embed.evaluation.ir import evaluate_and_rank

# Corpus texts embedded per step of encode_corpus: what is held in memory at once, texts and vectors.
CORPUS_CHUNK = 16_384


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


def encode_corpus(
    encoder: TextEncoder,
    texts: Iterable[str],
    size: int,
    kind: str,
    batch_size: int,
    truncate_dim: int | None = None,
    chunk_size: int | None = None,
    normalize: bool = False,
) -> Tensor:
    """``[size, truncate_dim or D]`` float32 embeddings in a memory-mapped file, embedded ``chunk_size`` texts at a
    time (default ``CORPUS_CHUNK``), so a big corpus never has all its texts in a list nor all its vectors in memory.

    Under ``torch.distributed`` each rank embeds its share of every chunk and the shares are gathered, so every
    rank ends with the whole corpus. ``normalize`` divides each vector by its length (for dot-product search).
    The file is deleted once the tensor is no longer used.
    """
    rank, world = rank_and_world()
    chunk_size = chunk_size or CORPUS_CHUNK
    dim = truncate_dim or encoder.embedding_dim
    with tempfile.NamedTemporaryFile(prefix="lit_embed-corpus-", suffix=".npy") as file:
        vectors = np.lib.format.open_memmap(file.name, mode="w+", dtype=np.float32, shape=(size, dim))
    # The name is gone, the mapping stays: the disk space is freed with the array.
    texts = iter(texts)
    for start in range(0, size, chunk_size):
        chunk = list(itertools.islice(texts, chunk_size))  # [n]
        share = chunk[rank * len(chunk) // world : (rank + 1) * len(chunk) // world]
        embedded = all_gather_rows(encode_texts(encoder, share, kind, batch_size, truncate_dim))[0].float()
        if normalize:
            embedded = F.normalize(embedded, dim=-1)
        vectors[start : start + len(chunk)] = embedded.cpu().numpy()  # [n, dim]
    return torch.from_numpy(vectors)


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
    queries, corpus, corpus_ids = embed_for_search(encoder, dataset, query_ids, batch_size, truncate_dim)
    metrics, rankings = evaluate_and_rank(
        queries, corpus, query_ids, corpus_ids, dataset.relevant_docs, DEFAULT_K, corpus_chunk_size=corpus_chunk_size
    )
    # Top hits as positions in the dataset's corpus order, as callers read them.
    position = torch.tensor([i for _, i in sorted((d, i) for i, d in enumerate(dataset.corpus))], dtype=torch.int32)
    hit = rankings[:, 0] >= 0
    rankings[hit, 0] = position[rankings[hit, 0].long()]
    if world == 1:
        return metrics, rankings
    # Every query has a relevant document (validated), so each rank's mean is over len(query_ids) queries.
    sums = torch.tensor([v * len(query_ids) for v in metrics.values()] + [len(query_ids)], dtype=torch.float64)
    sums = sums.to(queries.device)
    dist.all_reduce(sums)
    # Rank r searched queries r, r + world, ...: gathered in rank order, then put back in the dataset's order.
    gathered = all_gather_rows(rankings.to(queries.device))[0].cpu()  # [Q, 2]
    order = torch.cat([torch.arange(r, len(dataset.queries), world) for r in range(world)])
    in_order = torch.empty_like(gathered)
    in_order[order] = gathered
    return {key: (sums[i] / sums[-1]).item() for i, key in enumerate(metrics)}, in_order


def embed_for_search(
    encoder: TextEncoder,
    dataset: QADataset,
    query_ids: list[str],
    batch_size: int = 64,
    truncate_dim: int | None = None,
) -> tuple[Tensor, Tensor, list[str]]:
    """``(queries, corpus, corpus_ids)``: the embeddings of ``query_ids`` and of the whole corpus, the corpus in id
    order, the order in which equal scores rank, so an exact search needs no reordered copy of it."""
    corpus_ids = sorted(dataset.corpus)
    documents = (dataset.corpus[d] for d in corpus_ids)
    corpus = encode_corpus(encoder, documents, len(corpus_ids), "document", batch_size, truncate_dim)
    queries = encode_texts(encoder, [dataset.queries[q] for q in query_ids], "query", batch_size, truncate_dim)
    return queries, corpus, corpus_ids


def check_truncate_dim(truncate_dim: int | None, embedding_dim: int) -> None:
    """Raises a ``LitEmbedError`` unless ``truncate_dim`` is None or between 1 and ``embedding_dim``."""
    if truncate_dim is not None and not 1 <= truncate_dim <= embedding_dim:
        raise LitEmbedError(
            f"truncate_dim={truncate_dim} is not a size of this model's {embedding_dim}-dimensional embeddings: set "
            f"eval.truncate_dim (lit-embed-eval --truncate-dim) between 1 and {embedding_dim}, or to null to score "
            "the full embeddings."
        )


def format_metrics_table(metrics: dict[str, dict[str, float]], keys: Sequence[str] = METRIC_TABLE_KEYS) -> str:
    """A small table of the headline retrieval metrics (``keys``), one column per entry, and the last one's change
    over the first when there are several."""
    # metrics.json's other entries ("merge", "skipped") are not columns.
    columns = [name for name, values in metrics.items() if isinstance(values, dict) and keys[0] in values]
    if not columns:
        return "No validation set: nothing to compare."
    lines = [f"{'metric':<14}" + "".join(f"{c:>10}" for c in columns) + (f"{'change':>10}" if len(columns) > 1 else "")]
    for key in keys:
        values = [metrics[c][key] for c in columns]
        change = f"{values[-1] - values[0]:>+10.4f}" if len(values) > 1 else ""
        lines.append(f"{key:<14}" + "".join(f"{v:>10.4f}" for v in values) + change)
    return "\n".join(lines)
