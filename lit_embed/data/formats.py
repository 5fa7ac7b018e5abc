"""Loading retrieval data from any supported file: the one dispatcher above the readers.

The extension picks the reader:

* ``.json``: LlamaIndex's ``EmbeddingQAFinetuneDataset``; ``.jsonl``: query/positive/negatives lines
  (:mod:`lit_embed.data.json_files`, which also writes both).
* ``.csv``, ``.parquet`` or a ``datasets`` ``save_to_disk`` directory: one pair per row (:mod:`lit_embed.data.tables`).

Every reader returns a validated :class:`~lit_embed.data.schema.QADataset`; :func:`training_rows` converts a
training file into a rows store instead (:mod:`lit_embed.data.rows`), streaming every format but LlamaIndex's JSON,
which is one JSON object and is read whole.
"""

from __future__ import annotations

import os
from pathlib import Path

from lit_embed.data.json_files import (
    jsonl_records,
    load_jsonl,
    load_llamaindex_json,
    save_jsonl,
    save_llamaindex_json,
)
from lit_embed.data.rows import ROWS_FORMAT, TrainingRows, write_examples, write_records
from lit_embed.data.schema import DEFAULT_POLICY, QADataset, Skipped, SkipPolicy, allow_or_refuse
from lit_embed.data.store import built_once, content_key, file_digest
from lit_embed.data.tables import load_table, table_records
from lit_embed.errors import DataFormatError

__all__ = ["load_dataset", "save_jsonl", "save_llamaindex_json", "training_rows"]


def load_dataset(
    path: str | os.PathLike, columns: dict[str, str] | None = None, policy: SkipPolicy = DEFAULT_POLICY
) -> QADataset:
    """Loads and validates retrieval data; the extension picks the format.

    ``.json`` (LlamaIndex), ``.jsonl`` (query/positive/negatives lines), or a table: ``.csv``, ``.parquet`` or a
    ``datasets`` ``save_to_disk`` directory, whose column names ``columns`` gives (see
    :func:`lit_embed.data.tables.load_table`; JSON files have fixed keys and ignore it). Records wrong on their own
    are skipped as ``policy`` allows (see :func:`lit_embed.data.schema.validate`); the result's ``skipped`` lists them.
    """
    path = _existing(path)
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in (".csv", ".parquet"):
        return load_table(path, columns, policy)
    if suffix == ".json":
        return load_llamaindex_json(path, policy)
    if suffix == ".jsonl":
        return load_jsonl(path, policy)
    raise _unknown_extension(path)


def training_rows(
    path: str | os.PathLike,
    columns: dict[str, str] | None = None,
    policy: SkipPolicy = DEFAULT_POLICY,
    use_all_docs: bool = False,
    multi_positive: bool = False,
    cache_dir: str | os.PathLike | None = None,
    cache_lock: str = "file",
) -> TrainingRows:
    """The training rows of a data file, converted once into a store in ``cache_dir`` (built once per job as
    ``cache_lock`` says, see :func:`~lit_embed.data.store.built_once`) and memory-mapped.

    The store is keyed by the file's bytes and the settings that shape the rows, so later runs (and the other
    processes of a job) open it without reading the file again; its skipped records are reported on every run, and
    refused as ``policy`` says. Rows are those of :func:`load_dataset` plus
    :func:`~lit_embed.data.schema.training_examples`; ``.json`` is read whole, every other format one record at a
    time. ``cache_dir=None`` converts into a temporary directory of this process.
    """
    path = _existing(path)
    suffix = path.suffix.lower()
    if not (path.is_dir() or suffix in (".csv", ".parquet", ".json", ".jsonl")):
        raise _unknown_extension(path)
    key = content_key(ROWS_FORMAT, suffix, file_digest(path), columns and dict(columns), use_all_docs, multi_positive)
    fresh = []

    def build(directory: Path) -> None:
        fresh.append(directory)
        if suffix == ".json":
            write_examples(load_llamaindex_json(path, policy), directory, key, use_all_docs, multi_positive)
            return
        skipped = Skipped()
        records = jsonl_records(path, skipped) if suffix == ".jsonl" else table_records(path, columns, skipped)
        write_records(records, directory, key, str(path), skipped, policy, use_all_docs, multi_positive)

    rows = TrainingRows.load(built_once(cache_dir, f"rows-{key}", build, f"the training rows of {path}", cache_lock))
    if not fresh and rows.skipped is not None:  # converted by an earlier run: report its skipped records again
        allow_or_refuse(rows.skipped, str(path), policy)
    return rows


def dataset_rows(
    dataset: QADataset,
    use_all_docs: bool = False,
    multi_positive: bool = False,
    cache_dir: str | os.PathLike | None = None,
    cache_lock: str = "file",
) -> TrainingRows:
    """The training rows of a dataset built in memory (the stdlib data), stored as :func:`training_rows` stores a
    file's, keyed by their texts."""
    data = (dataset.queries, dataset.corpus, dataset.relevant_docs, dataset.hard_negatives, dataset.teacher_scores)
    key = content_key(ROWS_FORMAT, data, use_all_docs, multi_positive)

    def build(directory: Path) -> None:
        write_examples(dataset, directory, key, use_all_docs, multi_positive)

    return TrainingRows.load(built_once(cache_dir, f"rows-{key}", build, "the training rows", cache_lock))


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{path}: no such file. Check the path (relative paths are resolved from {Path.cwd()}).")
    return path


def _unknown_extension(path: Path) -> DataFormatError:
    return DataFormatError(
        f"{path}: unknown extension {path.suffix!r}. Use .json for LlamaIndex's EmbeddingQAFinetuneDataset, "
        ".jsonl for one {'query', 'positive', 'negatives'} object per line, .csv or .parquet for a table with those "
        "columns (data.columns renames them), or a directory saved by datasets' save_to_disk."
    )
