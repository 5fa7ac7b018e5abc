"""The rows store: converted once from a file in one streaming pass, equal to the in-memory loader's rows, reused."""

from __future__ import annotations

import json
import logging
import random
import tracemalloc
from pathlib import Path

import pytest

from lit_embed.data import store as store_module
from lit_embed.data.formats import load_dataset, training_rows
from lit_embed.data.schema import SkipPolicy, training_examples
from lit_embed.errors import DataFormatError


def messy_rows(n: int, seed: int, scored: bool = False) -> list[dict]:
    """Rows that exercise the grouping: repeated queries and documents, shared negatives, a negative with a positive's
    text (padded with spaces), empty texts, teacher scores given twice for a pair."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        query = f"question {rng.randrange(n // 2)}"
        positive = f"passage {rng.randrange(n // 2)}"
        negatives = [f"passage {rng.randrange(n)}" for _ in range(rng.randrange(4))]
        if rng.random() < 0.1:
            negatives.append(f"  {positive} ")
        if rng.random() < 0.03:
            negatives.append("")
        if rng.random() < 0.02:
            query = " "
        row = {"query": query, "positive": positive, "negatives": negatives}
        if scored:
            row["scores"] = [round(rng.random(), 3) for _ in range(1 + len(negatives))]
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("scored", [False, True])
@pytest.mark.parametrize(("use_all_docs", "multi_positive"), [(False, False), (True, False), (False, True)])
def test_streamed_rows_equal_the_loaders_examples(tmp_path: Path, scored: bool, use_all_docs, multi_positive) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", messy_rows(300, seed=1, scored=scored))
    policy = SkipPolicy(max_skipped=0.5)
    expected = training_examples(load_dataset(path, policy=policy), use_all_docs, multi_positive)
    rows = training_rows(path, None, policy, use_all_docs, multi_positive)
    assert rows.examples() == expected
    assert [e.query_id for e in rows.examples()] == [e.query_id for e in expected]
    assert [e.scores for e in rows.examples()] == [e.scores for e in expected]
    assert rows.skipped.as_dict() == load_dataset(path, policy=policy).skipped.as_dict()
    assert relevant_by_text(rows.dataset()) == relevant_by_text(load_dataset(path, policy=policy))


def relevant_by_text(dataset) -> dict[str, set[str]]:
    """Query text -> the texts of every document relevant to a query with that text."""
    relevant: dict[str, set[str]] = {}
    for qid, docs in dataset.relevant_docs.items():
        relevant.setdefault(dataset.queries[qid], set()).update(dataset.corpus[d] for d in docs)
    return relevant


def test_tables_and_llamaindex_json_give_the_loaders_rows(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lit_embed.data.formats import save_llamaindex_json

    source = [r for r in messy_rows(200, seed=2) if r["query"].strip()]
    parquet = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(source), parquet, row_group_size=7)
    policy = SkipPolicy(max_skipped=0.5)
    assert training_rows(parquet, policy=policy).examples() == training_examples(load_dataset(parquet, policy=policy))
    save_llamaindex_json(load_dataset(parquet, policy=policy), tmp_path / "train.json")
    json_path = tmp_path / "train.json"
    assert training_rows(json_path).examples() == training_examples(load_dataset(json_path))
    assert relevant_by_text(training_rows(json_path).dataset()) == relevant_by_text(load_dataset(json_path))


def test_a_jsonl_is_converted_without_holding_its_texts(tmp_path: Path) -> None:
    # 8,000 rows of ~2 kB: 16 MB of text. The conversion holds a hash per text and 1 MB read buffers, never the texts.
    rows = [{"query": f"q{i} " + "w" * 400, "positive": f"p{i} " + "x" * 1600} for i in range(8000)]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    tracemalloc.start()
    stored = training_rows(path, cache_dir=tmp_path / "cache")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert path.stat().st_size > 16_000_000
    assert peak < 6_000_000, peak
    assert len(stored) == 8000 and stored.documents.text(7999) == rows[7999]["positive"]


def test_a_second_conversion_reuses_the_store_and_a_change_makes_a_new_one(tmp_path: Path, caplog) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", messy_rows(100, seed=3))
    cache = tmp_path / "cache"
    policy = SkipPolicy(max_skipped=0.5)
    with caplog.at_level(logging.INFO, logger=store_module.__name__):
        first = training_rows(path, policy=policy, cache_dir=cache)
        built = [r for r in caplog.records if r.getMessage().startswith("Building")]
        again = training_rows(path, policy=policy, cache_dir=cache)
    assert len(built) == 1
    assert [r.getMessage().startswith("Building") for r in caplog.records].count(True) == 1
    assert again.key == first.key and again.examples() == first.examples()
    # The skipped records are reported again, and refused under a stricter policy, from the stored conversion.
    with pytest.raises(DataFormatError, match="data.strict=true refuses any"):
        training_rows(path, policy=SkipPolicy(strict=True), cache_dir=cache)
    assert training_rows(path, policy=policy, use_all_docs=True, cache_dir=cache).key != first.key
    with path.open("a") as f:
        f.write(json.dumps({"query": "one more", "positive": "line"}) + "\n")
    assert training_rows(path, policy=policy, cache_dir=cache).key != first.key
    assert len(list(cache.glob("rows-*"))) == 3
