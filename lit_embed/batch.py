"""The training batch: what the data module hands the LightningModule, typed.

A batch is one task's :class:`PairBatch`, or ``{task name: PairBatch}`` when a multi-task run trains every task in
each step. Each side of it (the queries, the documents) is one :class:`PackedTexts`: the texts' token ids one after
the other, unpadded, as the token store keeps them. An encoder that packs attends within each text; one that cannot
pads them itself (:meth:`PackedTexts.padded`). Lightning moves a batch to the device (it maps over dataclass fields)
and the DataLoader pins it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Features = dict[str, Any]  # what a tokenizer returns: input_ids, attention_mask, ... ([n, L] tensors) and extras


@dataclass
class PackedTexts:
    """Texts as one row of tokens, unpadded: every side of a batch, and what an encoder's forward takes.

    Attributes:
        input_ids: ``[1, T]`` every text's token ids, one text after the other.
        position_ids: ``[1, T]`` each token's position within its text.
        cu_seqlens: ``[n + 1]`` int32 offsets of the texts in the row (``cu_seqlens[i]`` = where text ``i`` starts).
        lengths: the ``n`` texts' token counts, on the host (cutting and padding need them without a device sync).
        extras: per-call values of the tokenizer (``prompt_length``, ``task``, ...), as padded features carry them.
        token_features: other per-token features, ``[1, T]`` each (type ids that are not all 0); usually none.
        texts: the ``n`` texts (references to the data's strings, so free to carry), for what needs the words
            rather than this tokenizer's ids: a guide model with its own tokenizer, a cache keyed by text. Empty
            when the texts were packed without them.
        length_groups: how an encoder computes them: 0 = packed, attention within each text, where the encoder can
            (``data.packing``); ``g`` = padded, in up to ``g`` groups of similar length (``data.length_groups``).
    """

    input_ids: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor
    lengths: list[int]
    extras: dict[str, Any] = field(default_factory=dict)
    token_features: dict[str, Tensor] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)
    length_groups: int = 0

    @classmethod
    def from_tokens(
        cls, values: Tensor, lengths: Sequence[int], extras: dict[str, Any] | None = None, **fields: Any
    ) -> PackedTexts:
        """``values``: ``[T]`` the texts' token ids one after the other; ``lengths``: each text's count;
        ``fields``: the other attributes (``texts``, ``token_features`` as ``[T]`` each, ``length_groups``)."""
        counts = torch.tensor(list(lengths), dtype=torch.int32)
        cu_seqlens = F.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))
        starts = torch.repeat_interleave(cu_seqlens[:-1].long(), counts.long())
        positions = torch.arange(len(values)) - starts
        token_features = {key: value.long()[None] for key, value in fields.pop("token_features", {}).items()}
        return cls(
            values.long()[None],
            positions[None],
            cu_seqlens,
            list(lengths),
            dict(extras or {}),
            token_features,
            **fields,
        )

    @classmethod
    def from_features(cls, features: Features, **fields: Any) -> PackedTexts:
        """Padded tokenizer features (``input_ids``, ``attention_mask`` and per-call extras) packed: each row's real
        tokens, whichever side it was padded on."""
        mask = features["attention_mask"].bool()
        extras = {key: value for key, value in features.items() if not isinstance(value, Tensor)}
        others = {
            key: value[mask]
            for key, value in features.items()
            if isinstance(value, Tensor) and key not in ("input_ids", "attention_mask") and value.any()
        }
        return cls.from_tokens(
            features["input_ids"][mask], mask.sum(1).tolist(), extras, token_features=others, **fields
        )

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def max_length(self) -> int:
        return max(self.lengths, default=0)

    def joins(self, other: PackedTexts) -> bool:
        """Whether the two can be embedded in one call: packed alike, with the same per-call values but the task
        (the query and the document side of a batch, when their prompts have the same length or there are none)."""

        def per_call(packed: PackedTexts) -> tuple:
            return (
                {k: v for k, v in packed.extras.items() if k != "task"},
                set(packed.token_features),
                packed.length_groups,
            )

        return per_call(self) == per_call(other)

    def join(self, other: PackedTexts) -> PackedTexts:
        """These texts followed by the other's (see :meth:`joins`)."""
        return PackedTexts(
            torch.cat([self.input_ids, other.input_ids], dim=1),
            torch.cat([self.position_ids, other.position_ids], dim=1),
            torch.cat([self.cu_seqlens, other.cu_seqlens[1:] + self.cu_seqlens[-1]]),
            self.lengths + other.lengths,
            self.extras,
            {key: torch.cat([value, other.token_features[key]], dim=1) for key, value in self.token_features.items()},
            self.texts + other.texts if self.texts and other.texts else [],
            self.length_groups,
        )

    def padded_to_multiple(self, multiple: int, pad_id: int) -> PackedTexts:
        """These texts followed by one text of padding, so that the row's length is a multiple of ``multiple``: the
        transformer then sees few distinct lengths (a compiled one, few shapes). The padding text attends only to
        itself; its tokens come after ``sum(lengths)`` and are for no text."""
        total = self.input_ids.size(1)
        tail = -total % multiple
        if not tail:
            return self
        device = self.input_ids.device
        return replace(
            self,
            input_ids=F.pad(self.input_ids, (0, tail), value=pad_id),
            position_ids=torch.cat([self.position_ids, torch.arange(tail, device=device)[None]], dim=1),
            cu_seqlens=torch.cat([self.cu_seqlens, self.cu_seqlens[-1:] + tail]),
            lengths=self.lengths + [tail],
            token_features={key: F.pad(value, (0, tail)) for key, value in self.token_features.items()},
            texts=[],
        )

    def split(self, counts: Sequence[int]) -> list[PackedTexts]:
        """Runs of ``counts[0]``, ``counts[1]``, ... texts, in order (the cached step's mini-batches); no device
        sync."""
        runs, first, start = [], 0, 0
        for count in counts:
            lengths = self.lengths[start : start + count]
            last = first + sum(lengths)
            tokens = slice(first, last)
            runs.append(
                replace(
                    self,
                    input_ids=self.input_ids[:, tokens],
                    position_ids=self.position_ids[:, tokens],
                    cu_seqlens=self.cu_seqlens[start : start + count + 1] - self.cu_seqlens[start],
                    lengths=lengths,
                    token_features={key: value[:, tokens] for key, value in self.token_features.items()},
                    texts=self.texts[start : start + count],
                )
            )
            first, start = last, start + count
        return runs

    def padded(self, rows: Sequence[int], side: str, pad_id: int) -> Features:
        """Tokenizer features of texts ``rows``, padded to the longest of them on ``side`` ("left" or "right"), as
        the tokenizer pads them at inference: what an encoder that cannot pack computes."""
        lengths = np.asarray(self.lengths, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)])[np.asarray(rows, dtype=np.int64)]  # [n]
        lengths = lengths[np.asarray(rows, dtype=np.int64)]  # [n]
        width = int(lengths.max(initial=0))
        columns = np.arange(width)
        first = width - lengths[:, None] if side == "left" else np.zeros_like(lengths)[:, None]  # [n, 1]
        real = (columns >= first) & (columns < first + lengths[:, None])  # [n, L]
        device = self.input_ids.device
        index = torch.from_numpy(np.where(real, starts[:, None] + columns - first, 0)).to(device)  # [n, L]
        mask = torch.from_numpy(real).to(device)

        def gathered(tokens: Tensor, fill: int) -> Tensor:  # [1, T] -> [n, L]
            return tokens[0][index].masked_fill(~mask, fill)

        features = {key: gathered(value, 0) for key, value in self.token_features.items()}
        return {"input_ids": gathered(self.input_ids, pad_id), "attention_mask": mask.long()} | features | self.extras

    def _map_tensors(self, function: Callable[[Tensor], Tensor]) -> PackedTexts:
        tensors = {name: function(getattr(self, name)) for name in ("input_ids", "position_ids", "cu_seqlens")}
        features = {key: function(value) for key, value in self.token_features.items()}
        return replace(self, token_features=features, **tensors)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedTexts:
        return self._map_tensors(lambda tensor: tensor.to(device=device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedTexts:
        return self._map_tensors(Tensor.pin_memory)


def padding_groups(sorted_lengths: Sequence[int], max_groups: int, max_candidates: int = 64) -> list[tuple[int, int]]:
    """Splits ascending lengths into at most ``max_groups`` contiguous groups with the fewest padded tokens.

    A group costs ``size x its longest length``. Exact dynamic programming over split points, restricted to at
    most ``max_candidates`` evenly spaced ones so huge batches stay cheap; another group is only taken when it
    saves at least 10% of the tokens. Returns ``(start, end)`` pairs.
    """
    n = len(sorted_lengths)
    if max_groups <= 1 or n <= 1:
        return [(0, n)]
    step = max(1, n // max_candidates)
    points = sorted(set(range(0, n, step)) | {n})  # candidate group boundaries, 0 and n included
    inf = float("inf")
    # best[k][j]: fewest tokens covering items before points[j] with k groups; back[k][j]: the previous boundary.
    best = [[inf] * len(points) for _ in range(max_groups + 1)]
    back = [[0] * len(points) for _ in range(max_groups + 1)]
    best[0][0] = 0
    for k in range(1, max_groups + 1):
        for j in range(1, len(points)):
            for i in range(j):
                cost = best[k - 1][i] + (points[j] - points[i]) * sorted_lengths[points[j] - 1]
                if cost < best[k][j]:
                    best[k][j], back[k][j] = cost, i
    k = 1  # each further forward pass has a fixed cost: take another group only if it saves 10% of the tokens
    while k < max_groups and best[k + 1][-1] < 0.9 * best[k][-1]:
        k += 1
    bounds, j = [], len(points) - 1
    while j > 0:
        i = back[k][j]
        bounds.append((points[i], points[j]))
        j, k = i, k - 1
    return bounds[::-1]


@dataclass
class PairBatch:
    """Queries, the documents that answer them, and hard negatives.

    Attributes:
        queries: ``B`` queries.
        documents: ``B + N`` documents: row ``i < B`` answers query ``i``; the ``N`` rows after them are the
            batch's hard negatives. Every document is a candidate for every query (in-batch negatives).
        query_ids: where each query came from, for error messages.
        task: the task these pairs belong to (``""`` for single-task data).
        scores: ``[B, 1 + k]`` a teacher's scores of each query's positive and its hard negatives, for the
            distillation losses (None: the data has none). ``k`` is the most negatives any row of the batch has; a
            row with fewer is padded with NaN.
        candidates: ``[B, 1 + k]`` the rows of ``documents`` those scores are of (set with ``scores``), -1 where a
            row is padded: ``candidates >= 0`` is the mask of real candidates. Column 0, the positive, is row ``i``.
        document_rows: ``[B + N]`` the query (row of this batch) each document was given with, as a positive or a
            hard negative (``doc_to_doc`` scoring leaves a query's own documents out). None: not recorded.
        positives: ``[B + N]`` bool, set when rows hold several positives (``data.multi_positive``): which documents
            are positives of their ``document_rows`` query. Row ``i < B`` is always one; the other positives come
            after the hard negatives, so the first ``B + N`` rows keep their layout. None: one positive per query.
        pairs: for a reranker, each query joined with each of its ``candidates`` as one sequence (the real entries
            of ``candidates``, row by row; :mod:`lit_embed.data.pairs`). None: the batch is for an encoder.
    """

    queries: PackedTexts
    documents: PackedTexts
    query_ids: list[str] = field(default_factory=list)
    task: str = ""
    scores: Tensor | None = None
    candidates: Tensor | None = None
    document_rows: Tensor | None = None
    positives: Tensor | None = None
    pairs: PackedTexts | None = None

    def __len__(self) -> int:
        return len(self.queries)

    def outputs(self, model: Callable[[PackedTexts], Tensor]) -> Embedded | Scored:
        """What ``model`` makes of the batch, which its loss takes: a reranker (a model that ``reads_pairs``)
        scores each query's candidates, an encoder embeds both sides."""
        return self.score(model) if getattr(model, "reads_pairs", False) else self.embed(model)

    def score(self, reranker: Callable[[PackedTexts], Tensor]) -> Scored:
        """Each query's candidates scored by a reranker: its logits of :attr:`pairs` laid out as ``candidates``."""
        assert self.pairs is not None and self.candidates is not None, "a reranker's batch carries pairs"
        mask = self.candidates >= 0  # [B, C]
        flat = reranker(self.pairs)  # [P], row by row
        # Each real cell's pair is the count of real cells before it; the others read an appended 0. A gather, not
        # a masked scatter: no device-to-host read of how many cells are real.
        index = torch.where(mask, mask.flatten().cumsum(0).view(mask.shape) - 1, len(self.pairs))
        logits = torch.cat([flat, flat.new_zeros(1)])[index]  # [B, C]
        return Scored(logits, mask, self.scores)

    def embed(self, encoder: Callable[[PackedTexts], Tensor]) -> Embedded:
        """The batch's embeddings; both sides go through the encoder in one call where they can."""
        if self.queries.joins(self.documents):
            both = encoder(self.queries.join(self.documents))  # [B + B + N, D]
            return self.embedded(both[: len(self)], both[len(self) :])
        return self.embedded(encoder(self.queries), encoder(self.documents))

    def embedded(self, queries: Tensor, documents: Tensor) -> Embedded:
        """These pairs with embeddings of them: ``queries [B, D]``, ``documents [B + N, D]``."""
        sides = (self.queries, self.documents)
        return Embedded(queries, documents, self.document_rows, self.positives, self.scores, self.candidates, sides)

    def pin_memory(self) -> PairBatch:
        pairs = self.pairs.pin_memory() if self.pairs is not None else None
        return replace(self, queries=self.queries.pin_memory(), documents=self.documents.pin_memory(), pairs=pairs)


@dataclass
class Embedded:
    """An embedded batch: what every loss is a function of.

    Attributes:
        queries: ``[B, D]`` the queries' embeddings.
        documents: ``[B + N, D]`` the documents' embeddings: row ``i < B`` is query ``i``'s positive, then hard
            negatives (then further positives, with ``positives``).
        document_rows, positives, scores, candidates: which documents belong to which query, and the teacher's
            scores of each query's candidates, as in :class:`PairBatch` (None: not given).
        sides: the batch's queries and documents (their texts, their tokens), for a loss that embeds them another
            way too (GIST's guide); None: not given.
    """

    queries: Tensor
    documents: Tensor
    document_rows: Tensor | None = None
    positives: Tensor | None = None
    scores: Tensor | None = None
    candidates: Tensor | None = None
    sides: tuple[PackedTexts, PackedTexts] | None = None


def pair_batches(batch: PairBatch | Mapping[str, PairBatch]) -> list[PairBatch]:
    """The pairs of every task in a batch (one for single-task and one-task-per-step multi-task data)."""
    return [batch] if isinstance(batch, PairBatch) else list(batch.values())


@dataclass
class Scored:
    """A reranker's scores of each query's candidates: what a reranker's loss takes, as an encoder's takes
    :class:`Embedded`.

    Attributes:
        logits: ``[B, C]`` query ``i``'s candidates' logits: column 0 its positive, then its negatives (hard, mined,
            other queries' documents); 0 where the row has fewer.
        mask: ``[B, C]`` the real candidates (column 0 always).
        teacher: ``[B, C]`` a teacher's scores of the same candidates, NaN where it has none (None: no teacher).
    """

    logits: Tensor
    mask: Tensor
    teacher: Tensor | None = None
