"""benchmarks/throughput.py --task rerank: lit_embed's reranker against sentence-transformers' CrossEncoderTrainer,
on the same rows (each query with its negatives), the same pairs per batch."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

ROW = re.compile(
    r"^\| (sentence-transformers|lit_embed) \| ([\d.]+) \| ([\d.]+) GiB \| ([\d.]+)% \| ([\d.]+|-) \| "
    r"([\d.]+) \| (\d+) \| ([\d.]+) \| (\d+) \|$",
    re.M,
)


def benchmark_module():
    """benchmarks/throughput.py as a module (registered first: its dataclasses look their module up)."""
    name = "benchmarks_throughput"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "throughput.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_rerank_rows_draw_distinct_negatives_from_other_rows_deterministically() -> None:
    throughput = benchmark_module()
    queries = [f"query {i}" for i in range(12)]
    documents = [f"document {i}" for i in range(12)]
    rows = throughput.rerank_rows(queries, documents, 3, seed=7)
    assert rows == throughput.rerank_rows(queries, documents, 3, seed=7)
    assert rows != throughput.rerank_rows(queries, documents, 3, seed=8)
    for row, query, positive in zip(rows, queries, documents, strict=True):
        assert (row["query"], row["positive"]) == (query, positive)
        negatives = row["negatives"]
        assert len(negatives) == len(set(negatives)) == 3 and positive not in negatives
        assert set(negatives) <= set(documents)
    with pytest.raises(SystemExit):
        throughput.rerank_rows(queries[:3], documents[:3], 3, seed=0)


def test_sentence_transformers_batches_hold_whole_queries() -> None:
    """A query's positive and its negatives (consecutive rows) stay in one batch, in their order."""
    group_sampler = benchmark_module().group_batch_sampler(4)
    dataset = list(range(4 * 10 + 2))  # 10 whole groups and a stray tail
    sampler = group_sampler(dataset, batch_size=8, drop_last=True, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5
    for batch in batches:
        assert len(batch) == 8
        for start in (0, 4):
            first = batch[start]
            assert first % 4 == 0 and batch[start : start + 4] == list(range(first, first + 4))
    assert sorted(i for batch in batches for i in batch) == list(range(40))
    sampler.set_epoch(1)
    assert list(sampler) != batches  # reshuffled every epoch


@pytest.mark.slow
def test_rerank_benchmark_runs_both_rerankers_on_the_same_pairs_per_batch(tmp_path: Path) -> None:
    # 5 steps: 1 warm-up, 2 timed and the last 2 profiled (the fewest the benchmark times).
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--task", "rerank", "--device", "cpu", "--model", "tiny"]
        + ["--batch-size", "4", "--steps", "5", "--warmup", "1", "--rounds", "1", "--no-evaluate"]
        + ["--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {m[0]: m[1:] for m in ROW.findall(result.stdout)}
    assert set(rows) == {"sentence-transformers", "lit_embed"}, result.stdout
    assert "batch 4 queries x 4 = 16 pairs" in result.stdout

    results = json.loads(out.read_text())
    assert results["args"]["task"] == "rerank" and results["args"]["negatives"] == 3
    for system in ("sentence-transformers", "lit_embed"):
        run = results[system]
        # Every step of both held 4 queries x (1 positive + 3 negatives) pairs.
        assert run["pairs_per_batch"] == 16, (system, run)
        assert run["pairs_per_second"] > 0 and run["peak_memory_gib"] > 0 and run["forward_passes_per_step"] >= 1
        assert run["mrr@10"] == []  # --no-evaluate
    assert results["ratio"] > 0
    printed = float(re.search(r"lit_embed / sentence-transformers: ([\d.]+)x pairs/s", result.stdout)[1])
    assert printed == pytest.approx(results["ratio"], abs=0.006)
    # lit_embed packs the pairs (no padding computed); sentence-transformers pads each batch to its longest pair.
    assert results["lit_embed"]["padding_overhead"] <= 1.02
    assert results["sentence-transformers"]["padding_overhead"] > 1.02
