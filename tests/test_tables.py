"""Pairs from CSV, Parquet and Hugging Face datasets directories, with renamed columns, load like JSONL does."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lit_embed.data.datamodule import QAPairDataModule
from lit_embed.data.formats import load_dataset
from lit_embed.data.schema import QADataset
from lit_embed.errors import DataFormatError

ROWS = [
    {"query": "q one", "positive": "doc one", "negatives": ["doc two", 'doc "three", with a comma']},
    {"query": "q two", "positive": "doc two\nsecond line", "negatives": []},
    {"query": "q one", "positive": "doc four", "negatives": ["doc two"]},  # same query: a second relevant doc
    {"query": "q three", "positive": "doc one", "negatives": []},
]
COLUMNS = {"query": "question", "positive": "answer", "negatives": "hard_negatives"}


def as_table(rows: list[dict]) -> dict[str, list]:
    """Column -> values, under the COLUMNS names, plus a column nobody asked for."""
    table = {new: [row[old] for row in rows] for old, new in COLUMNS.items()}
    return table | {"score": [0.5] * len(rows)}


def expected(tmp_path: Path) -> QADataset:
    """The same rows through the JSONL loader, whose "line N" ids are our "row N" ids."""
    path = tmp_path / "same.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    data = load_dataset(path)
    rename = {qid: qid.replace("line", "row") for qid in data.queries}
    return QADataset(
        {rename[q]: t for q, t in data.queries.items()},
        data.corpus,
        {rename[q]: d for q, d in data.relevant_docs.items()},
        {rename[q]: d for q, d in data.hard_negatives.items()},
    )


def write_csv(path: Path, header: list[str], records: list[list[str]], bom: bool = False) -> Path:
    with path.open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(records)
    return path


def test_csv_with_column_mapping_and_json_negatives(tmp_path: Path) -> None:
    table = as_table(ROWS)
    table["hard_negatives"] = [json.dumps(n) if n else "" for n in table["hard_negatives"]]  # empty cell = none
    path = write_csv(
        tmp_path / "pairs.csv", list(table), [list(r) for r in zip(*table.values(), strict=True)], bom=True
    )
    data = load_dataset(path, columns=COLUMNS)
    assert data == expected(tmp_path)
    assert data.queries["row 1"] == "q one" and data.corpus["d2"] == 'doc "three", with a comma'


def test_csv_with_default_columns_and_no_negatives(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "pairs.csv", ["positive", "query"], [["doc a", "q a"], [], ["doc b", "q b"]])
    data = load_dataset(path)
    assert data.queries == {"row 1": "q a", "row 2": "q b"}  # a blank line is not a row
    assert data.relevant_docs == {"row 1": ["d0"], "row 2": ["d1"]} and data.hard_negatives == {}


def test_parquet_with_column_mapping_and_list_negatives(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = as_table(ROWS)
    table["hard_negatives"][1] = None  # a null list = no negatives
    pq.write_table(pa.table(table), tmp_path / "pairs.parquet")
    assert load_dataset(tmp_path / "pairs.parquet", columns=COLUMNS) == expected(tmp_path)


def test_hf_datasets_directory(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict(as_table(ROWS))
    dataset.set_format("numpy")  # saved with the dataset; the loader must still get plain lists
    dataset.save_to_disk(str(tmp_path / "hf"))
    assert load_dataset(tmp_path / "hf", columns=COLUMNS) == expected(tmp_path)

    datasets.DatasetDict({"train": dataset, "test": dataset}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(DataFormatError, match=r"splits.*DatasetDict with splits \['test', 'train'\].*splits/test"):
        load_dataset(tmp_path / "splits", columns=COLUMNS)


def test_datamodule_passes_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t.csv", ["question", "answer"], [["q a", "doc a"], ["q b", "doc b"]])
    columns = {"query": "question", "positive": "answer"}
    data = QAPairDataModule(train_path=str(path), val_path=str(path), columns=columns, batch_size=2)
    data.prepare_data()
    assert [(e.query_id, e.query) for e in data.rows.examples()] == [("row 1", "q a"), ("row 2", "q b")]
    assert data.val_dataset.queries == {"row 1": "q a", "row 2": "q b"}


def test_missing_column_names_file_column_choices_and_setting(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "pairs.csv", ["question", "answer"], [["q", "d"]])
    with pytest.raises(DataFormatError) as err:
        load_dataset(path, columns={"query": "question", "positive": "passage"})
    message = str(err.value)
    for part in ["pairs.csv", "no column 'passage'", "['question', 'answer']", "data.columns.positive"]:
        assert part in message
    with pytest.raises(DataFormatError, match=r"no column 'negs' for the negatives"):
        load_dataset(path, columns={"query": "question", "positive": "answer", "negatives": "negs"})


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([["q", "d", "not json"]], r"t\.csv, row 1 \(line 2\): negatives \(column 'negs'\) must be a list"),
        ([["q", "d", '{"a": 1}']], r"row 1 \(line 2\): negatives .* must be a list"),
        ([["q", "d", '["ok", ""]']], r"row 1 \(line 2\): negatives\[1\] \(column 'negs'\) is empty"),
        ([["q", "d", "[]"], ["", "d", "[]"]], r"row 2 \(line 3\): query \(column 'query'\) is empty"),
        ([["q", "multi\nline", "[]"], ["q", "d"]], r"row 2 \(line 4\): 2 fields, but the header names 3 columns"),
        ([["q", "d", "[]", "extra, unquoted"]], r"row 1 \(line 2\): 4 fields"),
    ],
)
def test_bad_csv_rows_name_row_and_line(tmp_path: Path, records: list[list[str]], expected: str) -> None:
    path = write_csv(tmp_path / "t.csv", ["query", "positive", "negs"], records)
    with pytest.raises(DataFormatError, match=expected):
        load_dataset(path, columns={"negatives": "negs"})


def test_non_text_parquet_value_names_the_row(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"query": ["q", "r"], "positive": ["d", None]}), tmp_path / "t.parquet")
    with pytest.raises(DataFormatError, match=r"t\.parquet, row 2: positive \(column 'positive'\) is empty"):
        load_dataset(tmp_path / "t.parquet")
    pq.write_table(pa.table({"query": [1], "positive": ["d"]}), tmp_path / "ints.parquet")
    with pytest.raises(DataFormatError, match=r"row 1: query \(column 'query'\) is int, not text"):
        load_dataset(tmp_path / "ints.parquet")


@pytest.mark.parametrize(
    ("name", "content", "columns", "expected"),
    [
        ("empty.csv", "", None, r"empty\.csv: the file is empty"),
        ("keys.csv", "query,positive\nq,d\n", {"question": "q"}, r"unknown key\(s\) \['question'\]"),
        ("null.csv", "query,positive\nq,d\n", {"query": None}, r"data\.columns\.query must be a column name"),
        ("dup.csv", "query,query,positive\nq,q,d\n", None, r"dup\.csv: column 'query' appears 2 times"),
        ("fake.parquet", "not parquet", None, r"fake\.parquet: not a readable Parquet file"),
        ("data.tsv", "query\tpositive\n", None, r"unknown extension '\.tsv'.*\.csv or \.parquet.*save_to_disk"),
    ],
)
def test_bad_tables(tmp_path: Path, name: str, content: str, columns, expected: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(DataFormatError, match=expected):
        load_dataset(tmp_path / name, columns=columns)


def test_plain_directory_is_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"not one written by datasets' save_to_disk"):
        load_dataset(tmp_path)
