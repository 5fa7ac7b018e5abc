"""A cross-encoder's input: a query and a document read as one sequence, joined from their stored token ids.

A reranker's token store keeps each text's ids alone, without special tokens (as the embedding job's store keeps a
text once however many rows use it). A batch joins each query with each of its candidates the way the model's
tokenizer joins a pair (``[CLS] query [SEP] document [SEP]`` for BERT, ``<s> query </s></s> document </s>`` for
XLM-R), cut to the model's length as the tokenizer cuts a pair (``longest_first``), with the type ids the tokenizer
gives. :meth:`PairFormat.of` reads that template off the tokenizer itself and checks it, so training reads the
pairs exactly as ``CrossEncoder.predict`` will.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lit_embed.batch import PackedTexts

# Probe pairs the template is read from, then checked on: different lengths, so that no slot is mistaken for another.
PROBES = (("alpha beta", "gamma delta epsilon"), ("one two three four", "five"))


@dataclass(frozen=True)
class PairFormat:
    """A tokenizer's template for a pair: ``prefix + query + middle + document + suffix``.

    Attributes:
        prefix, middle, suffix: the template's own token ids around the two texts.
        types: the type ids of ``(prefix, query, middle, document, suffix)``, each a tuple for the template's parts
            and one id for a text's tokens; None when every type id is 0 (models without segments).
        max_length: the longest pair the model reads, template included.
    """

    prefix: tuple[int, ...]
    middle: tuple[int, ...]
    suffix: tuple[int, ...]
    types: tuple[tuple[int, ...], int, tuple[int, ...], int, tuple[int, ...]] | None
    max_length: int

    @property
    def special_tokens(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)

    @property
    def text_budget(self) -> int:
        """Tokens left for the two texts together."""
        return self.max_length - self.special_tokens

    @classmethod
    def of(cls, tokenizer: Any, max_length: int) -> PairFormat | None:
        """The template ``tokenizer`` puts around a pair, read from probe pairs and checked on another, cut to
        ``max_length``; None when its pairs are not the two texts' own ids in a fixed template."""
        found = [cls._read(tokenizer, query, document, max_length) for query, document in PROBES]
        return found[0] if found[0] is not None and found[0] == found[1] else None

    @classmethod
    def _read(cls, tokenizer: Any, query: str, document: str, max_length: int) -> PairFormat | None:
        pair = tokenizer(query, document, truncation=False)
        ids, type_ids = list(pair["input_ids"]), pair.get("token_type_ids")
        q = tokenizer(query, add_special_tokens=False)["input_ids"]
        d = tokenizer(document, add_special_tokens=False)["input_ids"]
        starts = [i for i in range(len(ids)) if ids[i : i + len(q)] == q]
        for i in starts:
            after = i + len(q)
            ends = [j for j in range(after, len(ids)) if ids[j : j + len(d)] == d]
            if not ends:
                continue
            j = ends[0]
            parts = ((0, i), (after, j), (j + len(d), len(ids)))
            prefix, middle, suffix = (tuple(ids[a:b]) for a, b in parts)
            types = None
            if type_ids is not None and any(type_ids):
                t = list(type_ids)
                if len(set(t[i:after])) != 1 or len(set(t[j : j + len(d)])) != 1:
                    return None
                types = (tuple(t[0:i]), t[i], tuple(t[after:j]), t[j], tuple(t[j + len(d) :]))
            return cls(prefix, middle, suffix, types, max_length)
        return None

    def lengths(self, query: int, document: int) -> tuple[int, int]:
        """How many of each text's tokens a pair keeps, as a tokenizer's ``longest_first`` truncation keeps them:
        the shorter (the query, when equal) keeps up to half the budget, the other the rest.

        The store keeps at most :attr:`text_budget` tokens of a text, so two texts both at least that long look equal
        here: for an odd budget the query then keeps one token fewer than the tokenizer would leave it, when the
        query is the longer one (a query of more than ``max_length - 3`` tokens: not a retrieval query)."""
        budget = self.text_budget
        if query + document <= budget:
            return query, document
        if query > document:
            kept = min(document, budget // 2)
            return budget - kept, kept
        kept = min(query, budget // 2)
        return kept, budget - kept

    def join(self, query: np.ndarray, document: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """One pair's token ids and type ids (None without segments)."""
        a, b = self.lengths(len(query), len(document))
        parts = (self.prefix, query[:a], self.middle, document[:b], self.suffix)
        ids = np.concatenate([np.asarray(part, dtype=np.int64) for part in parts])
        if self.types is None:
            return ids, None
        prefix, query_type, middle, document_type, suffix = self.types
        types = np.concatenate(
            [
                np.asarray(prefix, dtype=np.int64),
                np.full(a, query_type, dtype=np.int64),
                np.asarray(middle, dtype=np.int64),
                np.full(b, document_type, dtype=np.int64),
                np.asarray(suffix, dtype=np.int64),
            ]
        )
        return ids, types

    def pack(
        self,
        queries: Sequence[np.ndarray],
        documents: Sequence[np.ndarray],
        grid: np.ndarray,
        extras: dict[str, Any] | None = None,
        length_groups: int = 0,
    ) -> PackedTexts:
        """Every real pair of ``grid`` (``[B, C]`` rows of ``documents`` for each of the ``B`` queries, -1 where a
        row has fewer), in row-major order, as one :class:`PackedTexts` (type ids as a token feature)."""
        ids, types, lengths = [], [], []
        for row, columns in enumerate(grid.tolist()):
            for column in columns:
                if column < 0:
                    continue
                pair_ids, pair_types = self.join(queries[row], documents[column])
                ids.append(pair_ids)
                types.append(pair_types)
                lengths.append(len(pair_ids))
        features = {}
        if self.types is not None:
            features["token_type_ids"] = torch.from_numpy(np.concatenate(types))
        return PackedTexts.from_tokens(
            torch.from_numpy(np.concatenate(ids)),
            lengths,
            extras,
            token_features=features,
            length_groups=length_groups,
        )
