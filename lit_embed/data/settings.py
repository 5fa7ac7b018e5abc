"""What a :class:`~lit_embed.data.datamodule.QAPairDataModule` is asked to do, in three records that check themselves:
which rows the files give, how the rows become batches, how the files are read and kept.

The config keeps one flat level (``data.train_path``, ``data.batch_size``: the keys users type, and the names in
every message); :func:`grouped` puts each key into the record that owns it, and :data:`DataSettings` is their union
as keyword arguments, so Hydra, LightningCLI and Python callers all see the same typed names.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from lit_embed.data.schema import SkipPolicy
from lit_embed.data.store import CACHE_LOCKS
from lit_embed.errors import check, is_bool, is_int, is_number


def _check_flags(record: Any, *keys: str) -> None:
    for key in keys:
        check(is_bool(getattr(record, key)), key, getattr(record, key), "true or false")


@dataclass(frozen=True)
class RowSettings:
    """Which training rows, and which validation set, the files give.

    Attributes:
        train_path: training data (``.json`` = LlamaIndex EmbeddingQAFinetuneDataset, ``.jsonl`` = pairs, or a
            ``.csv`` / ``.parquet`` / ``datasets`` directory with one pair per row).
        val_path: validation data for IR evaluation (optional).
        val_fraction: without ``val_path``, hold out this fraction of the training queries (at most 1000; none
            below 200 queries) as the validation set (0 = train on all, without validation).
        use_all_docs: False = one pair per query (its first relevant doc, as LlamaIndex); True = one per
            (query, relevant doc).
        multi_positive: one row per query with all its relevant documents, each a positive that is never another
            positive's negative (the loss must be MNRL, cached or Matryoshka around it); overrides ``use_all_docs``.
        max_negatives: cap on hard negatives per pair (None = all the data has).
        mine: train on one hard negative per query mined with the base model from the training corpus (in place of
            the file's), as ``lit-embed-mine --num-negatives 1 --relative-margin 0.05``; done by the training app.
    """

    train_path: str | None = None
    val_path: str | None = None
    val_fraction: float = 0.0
    use_all_docs: bool = False
    multi_positive: bool = False
    max_negatives: int | None = None
    mine: bool = False

    def __post_init__(self) -> None:
        check(
            self.max_negatives is None or is_int(self.max_negatives) and self.max_negatives >= 0,
            "max_negatives",
            self.max_negatives,
            "a whole number >= 0, or null for every hard negative the data has",
        )
        check(
            is_number(self.val_fraction) and 0 <= self.val_fraction < 1,
            "val_fraction",
            self.val_fraction,
            "a fraction of the training queries from 0 to below 1 (0.1 = 10%), or 0 for no validation slice",
        )
        _check_flags(self, "use_all_docs", "multi_positive", "mine")


@dataclass(frozen=True)
class BatchSettings:
    """How the training rows become batches, and how batches reach the model.

    Attributes:
        batch_size: pairs per batch; each query sees ``batch_size - 1`` in-batch negatives. ``"auto"``: set by the
            default recipe (:mod:`lit_embed.training.recipe`) before training.
        max_tokens_per_batch: the most tokens (queries, positives and negatives, as tokenized) a batch holds, per
            process: a batch of ``batch_size`` pairs over it is cut into parts of similar token counts, so memory is
            bounded by tokens when lengths are very uneven. None: every batch has ``batch_size`` pairs.
        length_groups: pad each batch's texts in up to this many groups of similar length, so one long text
            does not pad the rest (1 = pad the whole batch to its longest text). Same texts, same loss.
        packing: ``"auto"``: each side of a batch is one packed row of tokens, attended to one text at a time, so
            no padding is computed at all (:mod:`lit_embed.models.packed`), where the encoder can pack; length
            groups where it cannot. ``True``: the same, and an encoder that cannot pack is a warning saying why.
            ``False``: length groups. Same texts, same loss.
        seed: shuffling seed.
        drop_last: drop a final incomplete batch.
        num_workers: DataLoader worker processes for collation.
        pin_memory: collate into page-locked memory, so copies to the GPU overlap compute (ignored on the CPU).
    """

    batch_size: int | str = 16
    max_tokens_per_batch: int | None = None
    length_groups: int = 4
    packing: bool | str = "auto"
    seed: int = 0
    drop_last: bool = False
    num_workers: int = 0
    pin_memory: bool = True

    def __post_init__(self) -> None:
        check(
            is_int(self.batch_size) and self.batch_size >= 1 or self.batch_size == "auto",
            "batch_size",
            self.batch_size,
            "a whole number of pairs >= 1, or auto (the default recipe's)",
        )
        check(
            self.max_tokens_per_batch is None or is_int(self.max_tokens_per_batch) and self.max_tokens_per_batch >= 1,
            "max_tokens_per_batch",
            self.max_tokens_per_batch,
            "a whole number of tokens per batch >= 1, or null for batches of batch_size pairs",
        )
        groups = self.length_groups
        check(is_int(groups) and groups >= 1, "length_groups", groups, "a whole number >= 1")
        packing = self.packing
        check(packing in (True, False, "auto"), "packing", packing, "true, false or auto (packed where the model can)")
        check(is_int(self.seed), "seed", self.seed, "a whole number")
        check(
            is_int(self.num_workers) and self.num_workers >= 0, "num_workers", self.num_workers, "a whole number >= 0"
        )
        _check_flags(self, "drop_last", "pin_memory")


@dataclass(frozen=True)
class ReadSettings:
    """How the files are read, and where what is made of them is kept.

    Attributes:
        columns: for .csv/.parquet/datasets-directory data, which column holds what, e.g.
            ``{"query": "question", "positive": "answer"}`` (unset roles: columns named query, positive, negatives).
        max_skipped: records wrong on their own (an empty text, an unknown id, a query without a relevant
            document, a hard negative equal to a positive) that a file may hold; they are skipped with a warning.
            A fraction of the file's records below 1 (0.01 = 1%), or a whole number of records.
        strict: refuse a file with any such record instead.
        cache_dir: where the training rows and their token ids are stored, converted and tokenized once for every
            later run and every process of a job (keyed by the data, the tokenizer, the prompts and the length);
            None: into a temporary directory of this process.
        cache_lock: how the processes of a job build each store once. ``file``: an OS file lock, for one machine
            and for shared storage whose locks hold across machines (NFSv4, GPFS, Lustre mounted ``-o flock``).
            ``rank0``: the job's rank 0 builds and the other processes wait for the finished store, for shared
            storage whose locks do not (Lustre ``-o localflock``, BeeGFS); every node must see the same cache_dir.
    """

    columns: Mapping[str, str] | None = None
    max_skipped: float = 0.01
    strict: bool = False
    cache_dir: str | None = None
    cache_lock: str = "file"

    def __post_init__(self) -> None:
        skipped = self.max_skipped
        check(
            is_number(skipped) and 0 <= skipped < 1 or is_int(skipped) and skipped >= 1,
            "max_skipped",
            skipped,
            "a fraction of the records from 0 to below 1 (0.01 = 1%), or a whole number of records >= 1",
        )
        check(
            self.columns is None or isinstance(self.columns, Mapping),
            "columns",
            self.columns,
            "which column holds what, e.g. ++data.columns.query=question, or null",
        )
        _check_flags(self, "strict")
        check(
            self.cache_lock in CACHE_LOCKS,
            "cache_lock",
            self.cache_lock,
            "file (an OS lock: one machine, or shared storage that locks across machines) or rank0 (rank 0 builds, "
            "the others wait: shared storage that does not)",
        )

    @property
    def skip_policy(self) -> SkipPolicy:
        return SkipPolicy(self.max_skipped, self.strict)


RECORDS = (RowSettings, BatchSettings, ReadSettings)

# Every key of the three records, typed: what ``QAPairDataModule(**settings)`` takes (``Unpack[DataSettings]``).
DataSettings = TypedDict(  # type: ignore[misc]
    "DataSettings",
    {name: kind for record in RECORDS for name, kind in typing.get_type_hints(record).items()},
    total=False,
)
# Their descriptions too, for LightningCLI's --help (each record's Attributes, as arguments).
DataSettings.__doc__ = "The data settings, by name.\n\nArgs:\n" + "".join(
    record.__doc__.split("Attributes:\n", 1)[1].rstrip() + "\n" for record in RECORDS
)


def grouped(settings: Mapping[str, Any]) -> tuple[RowSettings, BatchSettings, ReadSettings]:
    """The three records of flat settings (each key into the record that owns it; unset keys keep its default)."""
    owners = {field.name: record for record in RECORDS for field in dataclasses.fields(record)}
    for key in settings:
        if key not in owners:
            near = difflib.get_close_matches(key, owners, n=1)
            raise TypeError(f"unexpected keyword argument {key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    rows, batching, reading = (
        record(**{key: value for key, value in settings.items() if owners[key] is record}) for record in RECORDS
    )
    return rows, batching, reading
