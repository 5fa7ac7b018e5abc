"""The training batch: what the data module hands the LightningModule, typed.

A batch is one task's :class:`PairBatch`, or ``{task name: PairBatch}`` when a multi-task run trains every task in
each step. Lightning moves both to the device (it maps over dataclass fields) and the DataLoader pins them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

Features = dict[str, Any]  # what a tokenizer returns: input_ids, attention_mask, ... ([n, L] tensors) and extras


@dataclass
class PackedTexts:
    """Texts as one row of tokens, unpadded: what a packed batch side holds and the encoder's forward takes.

    Attributes:
        input_ids: ``[1, T]`` every text's token ids, one text after the other.
        position_ids: ``[1, T]`` each token's position within its text.
        cu_seqlens: ``[n + 1]`` int32 offsets of the texts in the row (``cu_seqlens[i]`` = where text ``i`` starts).
        lengths: the ``n`` texts' token counts, on the host (the per-text fallbacks need them without a device sync).
        extras: per-call values of the tokenizer (``prompt_length``, ``task``, ...), as the padded features carry them.
    """

    input_ids: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor
    lengths: list[int]
    extras: dict[str, Any]

    @classmethod
    def from_tokens(cls, values: Tensor, lengths: list[int], extras: dict[str, Any] | None = None) -> PackedTexts:
        """``values``: ``[T]`` the texts' token ids one after the other; ``lengths``: each text's count."""
        counts = torch.tensor(lengths, dtype=torch.int32)
        cu_seqlens = F.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))
        starts = torch.repeat_interleave(cu_seqlens[:-1].long(), counts.long())
        positions = torch.arange(len(values)) - starts
        return cls(values.long()[None], positions[None], cu_seqlens, list(lengths), dict(extras or {}))

    @classmethod
    def from_features(cls, features: Features) -> PackedTexts:
        """Padded tokenizer features (``input_ids``, ``attention_mask`` and per-call extras) packed: each row's real
        tokens, whichever side it was padded on."""
        mask = features["attention_mask"].bool()
        extras = {key: value for key, value in features.items() if not isinstance(value, Tensor)}
        return cls.from_tokens(features["input_ids"][mask], mask.sum(1).tolist(), extras)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def max_length(self) -> int:
        return max(self.lengths, default=0)

    def joins(self, other: PackedTexts) -> bool:
        """Whether the two can be embedded in one call: the same per-call values but the task (the query and the
        document side of a batch, when their prompts have the same length or there are none)."""

        def per_call(packed: PackedTexts) -> dict[str, Any]:
            return {key: value for key, value in packed.extras.items() if key != "task"}

        return per_call(self) == per_call(other)

    def join(self, other: PackedTexts) -> PackedTexts:
        """This row of texts followed by the other's (see :meth:`joins`)."""
        cu_seqlens = torch.cat([self.cu_seqlens, other.cu_seqlens[1:] + self.cu_seqlens[-1]])
        return PackedTexts(
            torch.cat([self.input_ids, other.input_ids], dim=1),
            torch.cat([self.position_ids, other.position_ids], dim=1),
            cu_seqlens,
            self.lengths + other.lengths,
            self.extras,
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
        return PackedTexts(
            F.pad(self.input_ids, (0, tail), value=pad_id),
            torch.cat([self.position_ids, torch.arange(tail, device=device)[None]], dim=1),
            torch.cat([self.cu_seqlens, self.cu_seqlens[-1:] + tail]),
            self.lengths + [tail],
            self.extras,
        )

    def split(self, counts: Sequence[int]) -> list[PackedTexts]:
        """Runs of ``counts[0]``, ``counts[1]``, ... texts, in order (the cached loss's mini-batches); no device
        sync."""
        runs, first, start = [], 0, 0
        for count in counts:
            lengths = self.lengths[start : start + count]
            last = first + sum(lengths)
            cu_seqlens = self.cu_seqlens[start : start + count + 1] - self.cu_seqlens[start]
            tokens = slice(first, last)
            runs.append(
                PackedTexts(self.input_ids[:, tokens], self.position_ids[:, tokens], cu_seqlens, lengths, self.extras)
            )
            first, start = last, start + count
        return runs

    def _map_tensors(self, function: Callable[[Tensor], Tensor]) -> PackedTexts:
        tensors = ("input_ids", "position_ids", "cu_seqlens")
        return replace(self, **{name: function(getattr(self, name)) for name in tensors})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedTexts:
        return self._map_tensors(lambda tensor: tensor.to(device=device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedTexts:
        return self._map_tensors(Tensor.pin_memory)


@dataclass
class TokenGroups:
    """One side of a batch (its queries or its documents), padded in groups of similar length.

    Attributes:
        groups: padded features, one dict per length group; or one :class:`PackedTexts`, every text unpadded.
        order: ``[N]``; row ``i`` of the batch is row ``order[i]`` of the groups' outputs concatenated.
        texts: the ``N`` texts in the batch's row order (references to the data's strings, so free to carry), for
            what needs the words rather than this tokenizer's ids: a guide model with its own tokenizer, a cache
            keyed by text. Empty when the batch was built without them.
    """

    groups: list[Features] | list[PackedTexts]
    order: Tensor
    texts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.order)

    def embed(self, encoder: Callable[[Features], Tensor]) -> Tensor:
        """``[N, D]`` embeddings in the batch's row order, one encoder call per group."""
        return torch.cat([encoder(features) for features in self.groups])[self.order]  # [N, D]

    def pin_memory(self) -> TokenGroups:
        return TokenGroups([_pinned(features) for features in self.groups], self.order.pin_memory(), self.texts)


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
    """

    queries: TokenGroups
    documents: TokenGroups
    query_ids: list[str] = field(default_factory=list)
    task: str = ""
    scores: Tensor | None = None
    candidates: Tensor | None = None
    document_rows: Tensor | None = None
    positives: Tensor | None = None

    def __len__(self) -> int:
        return len(self.queries)

    def embed(self, encoder: Callable[[Features | PackedTexts], Tensor]) -> tuple[Tensor, Tensor]:
        """``(queries [B, D], documents [B + N, D])``; packed sides that can share a call go through the encoder
        together, one forward pass for the whole batch."""
        queries, documents = self.queries.groups[0], self.documents.groups[0]
        if (
            len(self.queries.groups) == len(self.documents.groups) == 1
            and isinstance(queries, PackedTexts)
            and isinstance(documents, PackedTexts)
            and queries.joins(documents)
        ):
            both = encoder(queries.join(documents))  # [B + B + N, D]
            size = len(self.queries)
            return both[:size][self.queries.order], both[size:][self.documents.order]
        return self.queries.embed(encoder), self.documents.embed(encoder)

    def pin_memory(self) -> PairBatch:
        return replace(self, queries=self.queries.pin_memory(), documents=self.documents.pin_memory())


def pair_batches(batch: PairBatch | Mapping[str, PairBatch]) -> list[PairBatch]:
    """The pairs of every task in a batch (one for single-task and one-task-per-step multi-task data)."""
    return [batch] if isinstance(batch, PairBatch) else list(batch.values())


def _pinned(features: Features | PackedTexts) -> Features | PackedTexts:
    if isinstance(features, PackedTexts):
        return features.pin_memory()
    return {key: value.pin_memory() if isinstance(value, Tensor) else value for key, value in features.items()}
