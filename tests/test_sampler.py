"""No-duplicate batches: every row once per epoch, no text twice in a batch, reshuffled from the seed."""

from __future__ import annotations

import random

from lit_embed.data.sampler import NoDuplicatesBatchSampler


def clashing_rows(n: int, vocab: int, seed: int = 0) -> list[tuple[int, ...]]:
    # A small vocabulary of texts makes clashes frequent.
    rng = random.Random(seed)
    return [tuple(rng.sample(range(vocab), 2)) for _ in range(n)]


def test_every_row_once_and_no_text_twice_per_batch() -> None:
    rows = clashing_rows(500, vocab=120)
    sampler = NoDuplicatesBatchSampler(rows, batch_size=16, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(rows)))
    for batch in batches:
        texts = [t for i in batch for t in rows[i]]
        assert len(texts) == len(set(texts)), batch
        assert 1 <= len(batch) <= 16


def test_reshuffles_per_epoch_and_repeats_from_seed() -> None:
    rows = [(i, 1000 + i) for i in range(64)]
    a = NoDuplicatesBatchSampler(rows, batch_size=8, seed=1)
    b = NoDuplicatesBatchSampler(rows, batch_size=8, seed=1)
    epoch0 = list(a)
    a.set_epoch(1)
    assert list(a) != epoch0
    b.set_epoch(1)
    assert list(b) == list(a)
    b.set_epoch(0)
    assert list(b) == epoch0
    assert list(NoDuplicatesBatchSampler(rows, batch_size=8, seed=2)) != epoch0


def test_identical_rows_never_share_a_batch() -> None:
    rows = [(0, 1)] * 5 + [(i, i + 100) for i in range(2, 30)]
    batches = list(NoDuplicatesBatchSampler(rows, batch_size=10, seed=0))
    for batch in batches:
        assert sum(1 for i in batch if rows[i] == (0, 1)) <= 1
    assert sorted(i for b in batches for i in b) == list(range(len(rows)))


def test_drop_last() -> None:
    rows = [(i, 100 + i) for i in range(20)]
    assert [len(b) for b in NoDuplicatesBatchSampler(rows, batch_size=8, drop_last=True)] == [8, 8]
    assert [len(b) for b in NoDuplicatesBatchSampler(rows, batch_size=8)] == [8, 8, 4]
