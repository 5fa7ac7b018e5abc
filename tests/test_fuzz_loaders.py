"""Every loader, fed thousands of generated inputs, ends in a dataset or one LitEmbedError that names the file.

Random bytes, JSON of every shape and type, CSV with stray quotes and separators, Parquet columns of the wrong type,
vector files of the wrong shape or dtype: never a traceback of any other exception. The examples are derandomized,
so a failure here fails the same way on every machine.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays, scalar_dtypes

from lit_embed.data.formats import load_dataset
from lit_embed.data.schema import QADataset, SkipPolicy
from lit_embed.errors import LitEmbedError
from lit_embed.models.precomputed import read_embedding_file

# The default, and one that skips every record wrong on its own, so the skipping paths are fuzzed too.
POLICIES = [SkipPolicy(), SkipPolicy(max_skipped=10**9)]
FUZZ = settings(
    max_examples=400, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)

# Any JSON value: what a broken pipeline may put where a text, an id or a list is expected.
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
texts = st.text(max_size=30) | st.sampled_from(["", "   ", "\ufeff", "x" * 100_000, "é\u2028\x00"])
# Text-like values, mostly texts, so that the loaders' deeper checks are reached too.
cells = texts | texts | json_values


def loads_or_names_the_file(path: Path, load: Callable[[Path], Any] | None = None) -> None:
    """Each load ends in a usable dataset or a LitEmbedError naming the file; datasets load strictly and leniently."""
    loads = [load] if load else [lambda p, policy=policy: load_dataset(p, policy=policy) for policy in POLICIES]
    for load_once in loads:
        try:
            result = load_once(path)
        except LitEmbedError as err:
            assert str(path) in str(err) or path.name in str(err), f"the message does not name the file: {err}"
            continue
        if isinstance(result, QADataset):
            assert all(isinstance(t, str) and t.strip() for t in (*result.queries.values(), *result.corpus.values()))
            assert all(ids and set(ids) <= set(result.corpus) for ids in result.relevant_docs.values())
            assert set(result.relevant_docs) == set(result.queries)


def written(name: str, content: bytes | str) -> Path:
    path = Path(tempfile.mkdtemp()) / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    return path


@pytest.mark.parametrize("name", ["data.json", "data.jsonl", "data.csv", "data.parquet"])
@FUZZ
@given(content=st.binary(max_size=300))
def test_random_bytes(name: str, content: bytes) -> None:
    loads_or_names_the_file(written(name, content))


@FUZZ
@given(
    raw=st.fixed_dictionaries(
        {},
        optional={
            "queries": st.dictionaries(st.text(max_size=5), cells, max_size=5) | json_values,
            "corpus": st.dictionaries(st.text(max_size=5), cells, max_size=5) | json_values,
            "relevant_docs": st.dictionaries(st.text(max_size=5), st.lists(st.text(max_size=5)) | json_values)
            | json_values,
            "mode": st.sampled_from(["text", "image"]) | json_values,
        },
    )
    | json_values
)
def test_llamaindex_json_of_any_shape(raw: Any) -> None:
    loads_or_names_the_file(written("qa.json", json.dumps(raw)))


@FUZZ
@given(
    lines=st.lists(
        st.fixed_dictionaries(
            {}, optional={"query": cells, "positive": cells, "negatives": st.lists(cells, max_size=3) | json_values}
        )
        | json_values,
        max_size=6,
    )
)
def test_jsonl_of_any_shape(lines: list[Any]) -> None:
    loads_or_names_the_file(written("pairs.jsonl", "".join(json.dumps(line) + "\n" for line in lines)))


@FUZZ
@given(
    header=st.lists(st.sampled_from(["query", "positive", "negatives", "other", ""]), min_size=0, max_size=4),
    rows=st.lists(
        st.lists(st.text(max_size=12) | st.sampled_from(['"', '""', ",", "\n", "[]", '["a", 1]']), max_size=5),
        max_size=6,
    ),
)
def test_csv_of_any_shape(header: list[str], rows: list[list[str]]) -> None:
    lines = [",".join(header)] + [",".join(row) for row in rows]
    loads_or_names_the_file(written("pairs.csv", "\n".join(lines)))


parquet_columns = (
    st.lists(st.none() | st.text(max_size=10), min_size=3, max_size=3)
    | st.lists(st.none() | st.integers(-5, 5), min_size=3, max_size=3)
    | st.lists(st.none() | st.lists(st.none() | st.text(max_size=5), max_size=3), min_size=3, max_size=3)
)


@FUZZ
@given(
    columns=st.dictionaries(st.sampled_from(["query", "positive", "negatives", "other"]), parquet_columns, max_size=4)
)
def test_parquet_of_any_shape(columns: dict[str, list[Any]]) -> None:
    path = Path(tempfile.mkdtemp()) / "pairs.parquet"
    pq.write_table(pa.table(columns) if columns else pa.table({"x": [1]}), path)
    loads_or_names_the_file(path)


@FUZZ
@given(
    vectors=arrays(scalar_dtypes(), array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)),
    ids=json_values | st.lists(st.text(max_size=4) | st.integers(), max_size=5),
)
def test_npy_vectors_of_any_shape_and_dtype(vectors: np.ndarray, ids: Any) -> None:
    path = Path(tempfile.mkdtemp()) / "vectors.npy"
    np.save(path, vectors, allow_pickle=False)
    path.with_suffix(".json").write_text(json.dumps(ids))
    loads_or_names_the_file(path, read_embedding_file)


@FUZZ
@given(
    ids=st.lists(st.none() | st.text(max_size=4) | st.integers(-3, 3), min_size=2, max_size=2),
    embeddings=st.lists(
        st.none() | st.lists(st.none() | st.floats(width=32) | st.integers(-3, 3), max_size=3), min_size=2, max_size=2
    ),
)
def test_parquet_vectors_of_any_shape(ids: list[Any], embeddings: list[Any]) -> None:
    path = Path(tempfile.mkdtemp()) / "vectors.parquet"
    try:
        table = pa.table({"id": ids, "embedding": embeddings})
    except (pa.ArrowException, TypeError):
        return  # arrow itself cannot hold this mix, so no pipeline can write it
    pq.write_table(table, path)
    loads_or_names_the_file(path, read_embedding_file)


@pytest.mark.parametrize("name", ["vectors.npy", "vectors.parquet"])
@FUZZ
@given(content=st.binary(max_size=300))
def test_vector_files_of_random_bytes(name: str, content: bytes) -> None:
    path = written(name, content)
    path.with_suffix(".json").write_text('["a"]')
    loads_or_names_the_file(path, read_embedding_file)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("deep.csv", "query,positive,negatives\nq,p," + '"' + "[" * 100_000 + "]" * 100_000 + '"\n'),
        ("deep.json", "[" * 100_000 + "]" * 100_000),
        ("deep.jsonl", '{"query": ' + "[" * 100_000 + "]" * 100_000 + "}\n"),
        ("huge.jsonl", json.dumps({"query": "q" * 5_000_000, "positive": "p"}) + "\n"),
        ("nan.json", '{"queries": {"q": NaN}, "corpus": {"d": Infinity}, "relevant_docs": {"q": ["d"]}}'),
        ("empty.json", ""),
        ("empty.csv", ""),
        ("bom_only.jsonl", "\ufeff"),
    ],
    ids=lambda value: value if len(value) < 20 else "",
)
def test_extremes(name: str, content: str) -> None:
    """Deep nesting (Python's recursion limit), huge texts, NaN literals, empty files."""
    loads_or_names_the_file(written(name, content))
