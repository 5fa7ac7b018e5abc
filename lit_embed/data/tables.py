"""Query/positive(/negatives) pairs from tables: CSV, Parquet, or a Hugging Face ``datasets`` directory.

Each row is one pair, as one line of the ``.jsonl`` format is. ``columns`` says which column holds what:
``{"query": "question", "positive": "answer", "negatives": "hard_negatives"}``; by default the columns are named
``query``, ``positive`` and ``negatives``, and the negatives column is optional. A negatives cell holds a list of
texts, or that list as a JSON string (``["first", "second"]``; the only way a CSV cell can hold one); an empty cell
means no negatives.

* ``.csv``: comma-separated, a header line naming the columns, UTF-8 (a byte-order mark is fine).
* ``.parquet``: needs ``pyarrow``.
* a directory written by ``datasets.Dataset.save_to_disk``: needs ``datasets``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lit_embed.data.schema import (
    DEFAULT_POLICY,
    QADataset,
    Record,
    Skipped,
    SkipPolicy,
    read_text,
    rows_to_dataset,
    validate,
)
from lit_embed.errors import DataFormatError

ROLES = ("query", "positive", "negatives")

# Reads the named columns; yields (row number from 1, where the row is for messages, {column: value}).
BLOCK_ROWS = 8192  # Parquet and datasets rows converted to Python at once

RowReader = Callable[[list[str]], Iterator[tuple[int, str, dict[str, Any]]]]


def load_table(
    path: str | os.PathLike, columns: Mapping[str, str] | None = None, policy: SkipPolicy = DEFAULT_POLICY
) -> QADataset:
    """Loads and validates a ``.csv``, ``.parquet`` or ``save_to_disk`` directory of pairs.

    Args:
        path: the file or directory.
        columns: role -> column name, roles being ``query``, ``positive`` and ``negatives``; missing roles use
            their own name as the column. A negatives column named here must exist.
        policy: how many rows with an empty query or positive (skipped) the table may hold; an empty negative is
            dropped from its row and counted the same way.

    Returns:
        The dataset, built as :func:`lit_embed.data.json_files.load_jsonl` builds it; query ids are ``"row N"``
        (N counts data rows from 1, the header excluded).
    """
    skipped = Skipped()
    return validate(rows_to_dataset(table_records(path, columns, skipped)), str(path), policy, skipped)


def table_records(path: str | os.PathLike, columns: Mapping[str, str] | None, skipped: Skipped) -> Iterator[Record]:
    """The usable rows of a table as records; Parquet and ``datasets`` tables are read in blocks of rows."""
    path = Path(path)
    names = _column_names(path, columns or {})
    if path.is_dir():
        available, read = _open_hf_dataset(path)
    elif path.suffix.lower() == ".csv":
        available, read = _open_csv(path)
    elif path.suffix.lower() == ".parquet":
        available, read = _open_parquet(path)
    else:
        raise DataFormatError(f"{path}: not a table; use .csv, .parquet or a datasets save_to_disk directory.")
    chosen = _choose_columns(path, available, names, negatives_required="negatives" in (columns or {}))
    for n, where, record in read(list(dict.fromkeys(chosen.values()))):
        skipped.records += 1
        texts = {role: _text(record[chosen[role]], where, role, chosen[role]) for role in ("query", "positive")}
        if "negatives" in chosen:
            negatives = _negatives(record[chosen["negatives"]], where, chosen["negatives"])
            texts |= {f"negatives[{i}]": text for i, text in enumerate(negatives)}
        for role, text in texts.items():
            if text is None:
                column = chosen[role.split("[")[0]]
                message = f"{where}: {role} (column {column!r}) is empty. Remove the row or fill in the text."
                skipped.add("empty_text", f"row {n} ({role})", message, f"row {n}")
        if texts["query"] is not None and texts["positive"] is not None:
            negatives = [text for role, text in texts.items() if role.startswith("negatives") and text is not None]
            yield f"row {n}", texts["query"], texts["positive"], negatives, None


def _column_names(path: Path, columns: Mapping[str, str]) -> dict[str, str]:
    unknown = sorted(set(columns) - set(ROLES))
    if unknown:
        raise DataFormatError(
            f"{path}: data.columns has unknown key(s) {unknown}. Its keys are {list(ROLES)}, each set to a column name."
        )
    for role, column in columns.items():
        if not isinstance(column, str) or not column:
            raise DataFormatError(f"{path}: data.columns.{role} must be a column name, got {column!r}.")
    return {role: columns.get(role, role) for role in ROLES}


def _choose_columns(
    path: Path, available: list[str], names: dict[str, str], negatives_required: bool
) -> dict[str, str]:
    """Role -> column, for the roles this table has (negatives only when present or asked for)."""
    chosen = {}
    for role, column in names.items():
        if column not in available:
            if role == "negatives" and not negatives_required:
                continue
            raise DataFormatError(
                f"{path}: no column {column!r} for the {role} texts; the columns are {available}. Set "
                f"data.columns.{role} to the column that holds them (on the command line: "
                f"++data.columns.{role}=COLUMN) or rename the column."
            )
        if available.count(column) > 1:
            raise DataFormatError(
                f"{path}: column {column!r} appears {available.count(column)} times. Rename the copies."
            )
        chosen[role] = column
    return chosen


def _text(value: Any, where: str, role: str, column: str) -> str | None:
    """The cell's text; None when it is empty (the caller skips it), an error when it holds something else."""
    if value is None or isinstance(value, str) and not value.strip():
        return None
    if not isinstance(value, str):
        raise DataFormatError(
            f"{where}: {role} (column {column!r}) is {type(value).__name__}, not text. Store texts in that column."
        )
    return value


def _negatives(value: Any, where: str, column: str) -> list[str | None]:
    """A list of texts (None for an empty one), the same list as a JSON string, or nothing (empty cell, null)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            value = None  # reported below with the fix
    if not isinstance(value, list):
        raise DataFormatError(
            f'{where}: negatives (column {column!r}) must be a list of texts or a JSON list such as ["first text", '
            '"second text"]. Fix the cell or leave it empty.'
        )
    return [_text(text, where, f"negatives[{i}]", column) for i, text in enumerate(value)]


def _open_csv(path: Path) -> tuple[list[str], RowReader]:
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        header = next(reader, None)
    except csv.Error as err:
        raise DataFormatError(f"{path}, line {reader.line_num}: unreadable CSV header ({err}).") from None
    if header is None:
        raise DataFormatError(f"{path}: the file is empty. Its first line must name the columns, e.g. query,positive")

    def read(columns: list[str]) -> Iterator[tuple[int, str, dict[str, Any]]]:
        index = {column: header.index(column) for column in columns}
        n, start = 0, reader.line_num + 1
        try:
            for record in reader:
                where = f"{path}, row {n + 1} (line {start})"
                start = reader.line_num + 1
                if not record:  # a blank line
                    continue
                n += 1
                if len(record) != len(header):
                    raise DataFormatError(
                        f"{where}: {len(record)} fields, but the header names {len(header)} columns. Put texts "
                        'that hold commas, quotes or line breaks in double quotes ("like, this"; a quote inside is "").'
                    )
                yield n, where, {column: record[i] for column, i in index.items()}
        except csv.Error as err:
            raise DataFormatError(f"{path}, line {reader.line_num}: unreadable CSV ({err}).") from None

    return header, read


def _open_parquet(path: Path) -> tuple[list[str], RowReader]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataFormatError(f"{path}: reading Parquet needs pyarrow: pip install 'lit_embed[parquet]'.") from None
    try:
        available = pq.read_schema(path).names
    except pa.ArrowException as err:
        raise DataFormatError(f"{path}: not a readable Parquet file ({err}). Rewrite it or check the path.") from None
    # Blocks of rows: a file larger than memory is read a block at a time.
    return available, lambda columns: _arrow_rows(
        path, (batch.to_pylist() for batch in pq.ParquetFile(path).iter_batches(BLOCK_ROWS, columns=columns))
    )


def _open_hf_dataset(path: Path) -> tuple[list[str], RowReader]:
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise DataFormatError(
            f"{path}: a DatasetDict with splits {splits}. Point the path at one split's directory, e.g. "
            f"{path / (splits[0] if splits else 'train')}."
        )
    if not any((path / name).is_file() for name in ("dataset_info.json", "state.json")):
        raise DataFormatError(
            f"{path}: a directory, but not one written by datasets' save_to_disk (it has neither dataset_info.json "
            "nor state.json). Pass a .json, .jsonl, .csv or .parquet file, or a save_to_disk directory."
        )
    try:
        import datasets
    except ImportError:
        raise DataFormatError(
            f"{path}: reading a Hugging Face datasets directory needs the datasets package: pip install datasets."
        ) from None
    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataFormatError(f"{path}: datasets cannot load it ({err}). Write it again with save_to_disk.") from None
    # Arrow format gives plain Python lists whatever format (numpy, torch) was saved with the dataset.
    return dataset.column_names, lambda columns: _arrow_rows(
        path, (block.to_pylist() for block in dataset.with_format("arrow", columns=columns).iter(BLOCK_ROWS))
    )


def _arrow_rows(path: Path, blocks: Iterable[list[dict[str, Any]]]) -> Iterator[tuple[int, str, dict[str, Any]]]:
    n = 0
    for block in blocks:
        for record in block:
            n += 1
            yield n, f"{path}, row {n}", record
