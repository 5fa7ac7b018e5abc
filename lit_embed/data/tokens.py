"""The token store: every distinct text tokenized once, kept unpadded, and padded per batch in length groups."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from lit_embed.batch import TokenGroups

log = logging.getLogger(__name__)


class TextTokenizer(Protocol):
    """What the data needs from an encoder (see ``lit_embed.models.encoder.Encoder``).

    An encoder with a ``padding_side`` attribute (``"left"`` or ``"right"``) has its batches padded on that side;
    one without (an adapter's table lookup) on the right.
    """

    pad_token_id: int
    max_seq_length: int

    def tokenize(self, texts: Sequence[str], kind: str) -> dict[str, Any]: ...


class TokenizedTexts:
    """Every distinct text of one kind (queries or documents), tokenized once and kept unpadded.

    Args:
        texts: distinct texts; row ``i`` of the store is ``texts[i]``.
        kind: ``"query"`` or ``"document"`` (selects the prompt).
        tokenizer: the encoder (its prompts and truncation apply).
        chunk_size: texts per tokenizer call.
    """

    def __init__(self, texts: Sequence[str], kind: str, tokenizer: TextTokenizer, chunk_size: int = 1024) -> None:
        self.texts = list(texts)
        self.rows: dict[str, list[Tensor]] = {}
        self.shared: dict[str, Any] = {}  # per-call values such as the prompt length, equal for every row
        for start in range(0, len(texts), chunk_size):
            features = tokenizer.tokenize(texts[start : start + chunk_size], kind)
            mask = features["attention_mask"].bool()
            for key, value in features.items():
                if isinstance(value, Tensor) and value.dim() == 2 and value.shape == mask.shape:
                    self.rows.setdefault(key, []).extend(row[m] for row, m in zip(value, mask, strict=True))
                else:
                    self.shared[key] = value
        self.padding_values = {key: tokenizer.pad_token_id if key == "input_ids" else 0 for key in self.rows}
        # Batches are padded as inference pads them (encode_query/encode_document): a model whose output depends on
        # where the padding is (one that reads the last position, absolute positions under left padding) then
        # trains on what it is used with. Models that pool from the mask give the same embeddings on either side.
        self.padding_side = getattr(tokenizer, "padding_side", "right")
        truncated = sum(len(mask) >= tokenizer.max_seq_length for mask in self.rows.get("attention_mask", []))
        if truncated:
            log.warning(
                "%d of %d %s texts reach model.max_seq_length=%d tokens and are cut there; raise "
                "model.max_seq_length to keep more of them.",
                truncated,
                len(texts),
                kind,
                tokenizer.max_seq_length,
            )

    def __len__(self) -> int:
        return len(self.rows["attention_mask"]) if self.rows else 0

    def pad(self, indices: Sequence[int]) -> dict[str, Any]:
        """Features of the chosen rows, padded to the longest of them on the tokenizer's padding side."""
        left = self.padding_side == "left"
        batch: dict[str, Any] = {}
        for key, rows in self.rows.items():
            chosen = [rows[i].flip(0) if left else rows[i] for i in indices]  # left: pad the reversed rows
            padded = torch.nn.utils.rnn.pad_sequence(chosen, batch_first=True, padding_value=self.padding_values[key])
            batch[key] = padded.flip(1) if left else padded
        return batch | self.shared

    def collate(self, indices: Sequence[int], max_groups: int = 1) -> TokenGroups:
        """The chosen rows as up to ``max_groups`` padded groups of similar length.

        One long document no longer pads the whole batch to its length: each group is padded to its own
        longest row. Only the padding changes: the texts of the batch, hence its in-batch negatives, are the
        same for any ``max_groups``.
        """
        lengths = [len(self.rows["attention_mask"][i]) for i in indices]
        by_length = sorted(range(len(indices)), key=lengths.__getitem__)
        bounds = padding_groups([lengths[i] for i in by_length], max_groups)
        groups = [self.pad([indices[i] for i in by_length[start:end]]) for start, end in bounds]
        order = torch.empty(len(indices), dtype=torch.long)
        order[torch.tensor(by_length, dtype=torch.long)] = torch.arange(len(indices))
        return TokenGroups(groups, order, [self.texts[i] for i in indices])


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
