"""No-duplicate batches: every row once per epoch, no text twice in a batch, reshuffled from the seed."""

from __future__ import annotations

import logging
import random
from itertools import combinations

import numpy as np
import pytest
import torch

from lit_embed.data import sampler as sampler_module
from lit_embed.data.ragged import Ragged
from lit_embed.data.sampler import NoDuplicatesBatchSampler, even_runs


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


def mined_rows(n: int, pool: int = 200, seed: int = 0) -> list[tuple[int, ...]]:
    # Like lit-embed-mine output: each row's query and positive are its own, its 3 negatives come from a small
    # pool shared by many rows, so rows clash often.
    rng = random.Random(seed)
    return [(i, n + i, *(2 * n + k for k in rng.sample(range(pool), 3))) for i in range(n)]


def assert_no_text_twice(rows: list[tuple[int, ...]], batches: list[list[int]]) -> None:
    for batch in batches:
        texts = [t for i in batch for t in rows[i]]
        assert len(texts) == len(set(texts)), batch


def test_mined_negatives_give_full_batches_and_drop_nothing() -> None:
    rows = mined_rows(2000)
    for epoch in range(3):
        sampler = NoDuplicatesBatchSampler(rows, batch_size=16, seed=7)
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert [len(b) for b in batches[:-1]] == [16] * (len(batches) - 1)
        assert sorted(i for b in batches for i in b) == list(range(len(rows)))
        assert_no_text_twice(rows, batches)


def test_mined_negatives_under_two_ranks() -> None:
    rows = mined_rows(2003, seed=1)
    ranks = [NoDuplicatesBatchSampler(rows, batch_size=8, seed=2, num_replicas=2, rank=r) for r in range(2)]
    per_rank = [list(s) for s in ranks]
    assert len(per_rank[0]) == len(per_rank[1])
    global_batches = [a + b for a, b in zip(*per_rank, strict=True)]
    assert [len(b) for b in global_batches[:-1]] == [16] * (len(global_batches) - 1)
    assert global_batches == ranks[0].global_batches()
    assert sorted(i for b in global_batches for i in b) == list(range(len(rows)))
    assert_no_text_twice(rows, global_batches)


def test_mined_negatives_are_deterministic_and_resume_exactly() -> None:
    rows = mined_rows(1000, seed=2)
    first = NoDuplicatesBatchSampler(rows, batch_size=16, seed=4)
    first.set_epoch(1)
    epoch1 = list(first)
    again = NoDuplicatesBatchSampler(rows, batch_size=16, seed=4)
    again.set_epoch(1)
    assert list(again) == epoch1
    resumed = NoDuplicatesBatchSampler(rows, batch_size=16, seed=4)
    resumed.resume_at(1, 20)
    assert list(resumed) == epoch1[20:]


def test_deferred_rows_are_logged_once_per_epoch(caplog) -> None:
    sampler = NoDuplicatesBatchSampler(mined_rows(500), batch_size=16, seed=0)
    with caplog.at_level(logging.INFO, logger=sampler_module.__name__):
        list(sampler)
        list(sampler)
        len(sampler)
    lines = [r.getMessage() for r in caplog.records if r.name == sampler_module.__name__]
    assert len(lines) == 1
    assert lines[0].startswith("Epoch 0: ") and "went into a later one" in lines[0]
    assert "of 500 rows" in lines[0]


def test_no_shared_texts_defer_nothing_and_log_nothing(caplog) -> None:
    rows = [(i, 1000 + i, 2000 + i) for i in range(100)]
    with caplog.at_level(logging.INFO, logger=sampler_module.__name__):
        batches = list(NoDuplicatesBatchSampler(rows, batch_size=16, seed=0))
    # Nothing waits: the batches are the shuffled order cut into pieces.
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0)).tolist()
    assert batches == [order[i : i + 16] for i in range(0, 100, 16)]
    assert not caplog.records


def test_vectorised_batches_at_scale_keep_every_guarantee() -> None:
    """50,000 mined rows over a pool of 2,000 negatives: each row once, no text twice in a batch, full batches but
    the last, the same batches for the same seed and epoch, and a ragged array gives what lists give."""
    rng = np.random.default_rng(0)
    n = 50_000
    negatives = (rng.integers(0, 2000, (n, 1)) + [0, 1, 2] * rng.integers(1, 666, (n, 1))) % 2000  # distinct per row
    rows = np.concatenate([np.arange(n)[:, None], n + np.arange(n)[:, None], 2 * n + negatives], 1)
    ragged = Ragged(rows.ravel(), np.arange(0, rows.size + 1, 5))
    batches = NoDuplicatesBatchSampler(ragged, batch_size=64, seed=5).global_batches()
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(n))
    assert [len(b) for b in batches[:-1]] == [64] * (len(batches) - 1)
    for batch in batches:
        texts = rows[batch].ravel()
        assert len(np.unique(texts)) == len(texts)
    assert NoDuplicatesBatchSampler(ragged, batch_size=64, seed=5).global_batches() == batches
    assert NoDuplicatesBatchSampler(rows[:2000].tolist(), 64, seed=5).global_batches() == (
        NoDuplicatesBatchSampler(ragged.take(np.arange(2000)), 64, seed=5).global_batches()
    )


def uneven_tokens(n: int, seed: int = 0) -> np.ndarray:
    # Row lengths spread as real ones are: most short, a long tail (a few rows 30x the median).
    return np.minimum(np.random.default_rng(seed).lognormal(np.log(150), 0.9, n).astype(np.int64) + 10, 3000)


def test_a_token_budget_cuts_batches_into_parts_that_fit() -> None:
    rows = mined_rows(3000, seed=5)
    tokens = uneven_tokens(len(rows))
    budget = 3000
    plain = NoDuplicatesBatchSampler(rows, batch_size=32, seed=1)
    sampler = NoDuplicatesBatchSampler(rows, batch_size=32, seed=1, row_tokens=tokens, max_tokens=budget)
    batches = list(sampler)
    assert len(batches) == len(sampler) > len(plain)
    assert sorted(i for b in batches for i in b) == list(range(len(rows)))  # every row once
    assert_no_text_twice(rows, batches)
    assert max(tokens[b].sum() for b in batches) <= budget
    # Each plain batch is cut in order into the fewest parts that fit, as even as that allows: their largest is no
    # larger than greedy filling's.
    parts = iter(batches)
    for batch in plain:
        pieces = [next(parts)]
        while sum(map(len, pieces)) < len(batch):
            pieces.append(next(parts))
        assert [row for piece in pieces for row in piece] == batch
        greedy, total = [0], 0
        for row in batch:
            if total + tokens[row] > budget:
                greedy.append(0)
                total = 0
            total += tokens[row]
            greedy[-1] = total
        assert len(pieces) == len(greedy)
        assert max(tokens[piece].sum() for piece in pieces) <= max(greedy)
    # A budget every batch fits leaves the batches as they were.
    roomy = NoDuplicatesBatchSampler(rows, batch_size=32, seed=1, row_tokens=tokens, max_tokens=10**9)
    assert list(roomy) == list(plain)


def test_a_token_budget_under_two_ranks_bounds_each_ranks_batch_and_keeps_every_row() -> None:
    rows = mined_rows(2001, seed=3)
    tokens = np.minimum(uneven_tokens(len(rows), seed=2), 2000)  # the data module refuses longer rows
    ranks = [
        NoDuplicatesBatchSampler(rows, 16, seed=2, num_replicas=2, rank=r, row_tokens=tokens, max_tokens=2000)
        for r in range(2)
    ]
    per_rank = [list(s) for s in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) > len(NoDuplicatesBatchSampler(rows, 16, seed=2, num_replicas=2))
    assert all(per_rank[0]) and all(per_rank[1])  # no rank ever has an empty step
    assert max(tokens[b].sum() for b in per_rank[0] + per_rank[1]) <= 2000
    global_batches = [a + b for a, b in zip(*per_rank, strict=True)]
    assert global_batches == ranks[0].global_batches()
    assert sorted(i for b in global_batches for i in b) == list(range(len(rows)))
    assert_no_text_twice(rows, global_batches)


def test_rows_over_half_the_budget_under_two_ranks_never_give_a_rank_an_empty_step() -> None:
    # Three rows, each over half the budget: two steps would need a row on each rank each time, so one row is left
    # out (and said) rather than a rank stepping on nothing or over its budget.
    tokens = np.array([60, 70, 80])
    ranks = [
        NoDuplicatesBatchSampler([[0], [1], [2]], 2, seed=0, num_replicas=2, rank=r, row_tokens=tokens, max_tokens=100)
        for r in range(2)
    ]
    steps = ranks[0].steps()
    assert steps == ranks[1].steps()
    assert all(part and tokens[part].sum() <= 100 for step in steps for part in step)
    assert sum(len(part) for step in steps for part in step) == 2


@pytest.mark.parametrize("seed", range(20))
def test_even_runs_are_as_even_as_any_cut_into_that_many(seed: int) -> None:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 50, size=int(rng.integers(1, 9)))
    for count in range(1, len(tokens) + 1):
        ends = even_runs(tokens, count)
        assert len(ends) == count and ends[-1] == len(tokens) and sorted(set(ends)) == ends
        best = min(
            max(part.sum() for part in np.split(tokens, list(cut)))
            for cut in combinations(range(1, len(tokens)), count - 1)
        )
        assert max(part.sum() for part in np.split(tokens, ends[:-1])) == best
