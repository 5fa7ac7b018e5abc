"""Loading retrieval data from any supported file: the one dispatcher above the readers.

The extension picks the reader:

* ``.json``: LlamaIndex's ``EmbeddingQAFinetuneDataset``; ``.jsonl``: query/positive/negatives lines
  (:mod:`lit_embed.data.json_files`, which also writes both).
* ``.csv``, ``.parquet`` or a ``datasets`` ``save_to_disk`` directory: one pair per row (:mod:`lit_embed.data.tables`).

Every reader returns a validated :class:`~lit_embed.data.schema.QADataset`.
"""

from __future__ import annotations

import os
from pathlib import Path

from lit_embed.data.json_files import load_jsonl, load_llamaindex_json, save_jsonl, save_llamaindex_json
from lit_embed.data.schema import DEFAULT_POLICY, QADataset, SkipPolicy
from lit_embed.data.tables import load_table
from lit_embed.errors import DataFormatError

__all__ = ["load_dataset", "save_jsonl", "save_llamaindex_json"]


def load_dataset(
    path: str | os.PathLike, columns: dict[str, str] | None = None, policy: SkipPolicy = DEFAULT_POLICY
) -> QADataset:
    """Loads and validates retrieval data; the extension picks the format.

    ``.json`` (LlamaIndex), ``.jsonl`` (query/positive/negatives lines), or a table: ``.csv``, ``.parquet`` or a
    ``datasets`` ``save_to_disk`` directory, whose column names ``columns`` gives (see
    :func:`lit_embed.data.tables.load_table`; JSON files have fixed keys and ignore it). Records wrong on their own
    are skipped as ``policy`` allows (see :func:`lit_embed.data.schema.validate`); the result's ``skipped`` lists them.
    """
    path = Path(path)
    if not path.exists():
        raise DataFormatError(f"{path}: no such file. Check the path (relative paths are resolved from {Path.cwd()}).")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in (".csv", ".parquet"):
        return load_table(path, columns, policy)
    if suffix == ".json":
        return load_llamaindex_json(path, policy)
    if suffix == ".jsonl":
        return load_jsonl(path, policy)
    raise DataFormatError(
        f"{path}: unknown extension {path.suffix!r}. Use .json for LlamaIndex's EmbeddingQAFinetuneDataset, "
        ".jsonl for one {'query', 'positive', 'negatives'} object per line, .csv or .parquet for a table with those "
        "columns (data.columns renames them), or a directory saved by datasets' save_to_disk."
    )
