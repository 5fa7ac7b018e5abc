"""LightningDataModules that serve tokenized (query, positive, negatives) batches."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from lit_embed.data.formats import (
    DataFormatError,
    QADataset,
    TrainingExample,
    load_dataset,
    training_examples,
)
from lit_embed.data.sampler import NoDuplicatesBatchSampler
from lit_embed.data.stdlib import build_stdlib_dataset
from lit_embed.errors import LitEmbedError

log = logging.getLogger(__name__)


class TextTokenizer(Protocol):
    """What the data needs from an encoder (see ``lit_embed.models.encoder.Encoder``)."""

    pad_token_id: int
    max_seq_length: int

    def tokenize(self, texts: Sequence[str], kind: str) -> dict[str, Any]: ...


class TokenizedTexts:
    """Every distinct text of one kind (queries or documents), tokenized once and kept unpadded.

    Args:
        texts: distinct texts; row ``i`` of the store is ``texts[i]``.
        kind: ``"query"`` or ``"document"`` (selects the prompt).
        tokenizer: the encoder (its prompts and truncation apply).
        chunk_size: texts per tokenizer call.
    """

    def __init__(self, texts: Sequence[str], kind: str, tokenizer: TextTokenizer, chunk_size: int = 1024) -> None:
        self.rows: dict[str, list[Tensor]] = {}
        self.shared: dict[str, Any] = {}  # per-call values such as the prompt length, equal for every row
        for start in range(0, len(texts), chunk_size):
            features = tokenizer.tokenize(texts[start : start + chunk_size], kind)
            mask = features["attention_mask"].bool()
            for key, value in features.items():
                if isinstance(value, Tensor) and value.dim() == 2 and value.shape == mask.shape:
                    self.rows.setdefault(key, []).extend(row[m] for row, m in zip(value, mask, strict=True))
                else:
                    self.shared[key] = value
        self.padding_values = {key: tokenizer.pad_token_id if key == "input_ids" else 0 for key in self.rows}
        truncated = sum(len(mask) >= tokenizer.max_seq_length for mask in self.rows.get("attention_mask", []))
        if truncated:
            log.warning(
                "%d of %d %s texts reach model.max_seq_length=%d tokens and are cut there; raise "
                "model.max_seq_length to keep more of them.",
                truncated,
                len(texts),
                kind,
                tokenizer.max_seq_length,
            )

    def __len__(self) -> int:
        return len(self.rows["attention_mask"]) if self.rows else 0

    def pad(self, indices: Sequence[int]) -> dict[str, Any]:
        """Features of the chosen rows, padded to the longest of them."""
        batch: dict[str, Any] = {
            key: torch.nn.utils.rnn.pad_sequence(
                [rows[i] for i in indices], batch_first=True, padding_value=self.padding_values[key]
            )
            for key, rows in self.rows.items()
        }
        return batch | self.shared

    def collate(self, indices: Sequence[int], max_groups: int = 1) -> dict[str, Any]:
        """The chosen rows as up to ``max_groups`` padded groups of similar length.

        One long document no longer pads the whole batch to its length: each group is padded to its own
        longest row. Returns ``{"groups": [features, ...], "order": [N]}``, where row ``i`` of the batch is row
        ``order[i]`` of the groups' concatenated outputs (see ``Encoder.embed``). Only the padding changes:
        the texts of the batch, hence its in-batch negatives, are the same for any ``max_groups``.
        """
        lengths = [len(self.rows["attention_mask"][i]) for i in indices]
        by_length = sorted(range(len(indices)), key=lengths.__getitem__)
        bounds = padding_groups([lengths[i] for i in by_length], max_groups)
        groups = [self.pad([indices[i] for i in by_length[start:end]]) for start, end in bounds]
        order = torch.empty(len(indices), dtype=torch.long)
        order[torch.tensor(by_length, dtype=torch.long)] = torch.arange(len(indices))
        return {"groups": groups, "order": order}


def padding_groups(sorted_lengths: Sequence[int], max_groups: int, max_candidates: int = 64) -> list[tuple[int, int]]:
    """Splits ascending lengths into at most ``max_groups`` contiguous groups with the fewest padded tokens.

    A group costs ``size x its longest length``. Exact dynamic programming over split points, restricted to at
    most ``max_candidates`` evenly spaced ones so huge batches stay cheap; another group is only taken when it
    saves at least 10% of the tokens. Returns ``(start, end)`` pairs.
    """
    n = len(sorted_lengths)
    if max_groups <= 1 or n <= 1:
        return [(0, n)]
    step = max(1, n // max_candidates)
    points = sorted(set(range(0, n, step)) | {n})  # candidate group boundaries, 0 and n included
    inf = float("inf")
    # best[k][j]: fewest tokens covering items before points[j] with k groups; back[k][j]: the previous boundary.
    best = [[inf] * len(points) for _ in range(max_groups + 1)]
    back = [[0] * len(points) for _ in range(max_groups + 1)]
    best[0][0] = 0
    for k in range(1, max_groups + 1):
        for j in range(1, len(points)):
            for i in range(j):
                cost = best[k - 1][i] + (points[j] - points[i]) * sorted_lengths[points[j] - 1]
                if cost < best[k][j]:
                    best[k][j], back[k][j] = cost, i
    k = 1  # each further forward pass has a fixed cost: take another group only if it saves 10% of the tokens
    while k < max_groups and best[k + 1][-1] < 0.9 * best[k][-1]:
        k += 1
    bounds, j = [], len(points) - 1
    while j > 0:
        i = back[k][j]
        bounds.append((points[i], points[j]))
        j, k = i, k - 1
    return bounds[::-1]


def index_dataloader(
    num_rows: int,
    batch_sampler: Sampler[list[int]],
    collate_fn: Callable[[list[int]], Any],
    num_workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader that hands the batch sampler's row indices to ``collate_fn`` (which builds the features)."""
    return DataLoader(
        range(num_rows),
        batch_sampler=batch_sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory and torch.cuda.is_available(),
        # Its own generator, so starting an epoch does not draw from the global RNG that dropout uses:
        # a resumed run then replays dropout exactly.
        generator=torch.Generator().manual_seed(seed),
    )


def distributed_position(trainer: L.Trainer | None) -> tuple[int, int]:
    """``(rank, world size)`` for sharding the training batches; checks Lightning will not re-shard them."""
    if trainer is None or trainer.world_size == 1:
        return 0, 1
    if getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
        raise LitEmbedError(
            "under a distributed strategy lit_embed shards each global no-duplicates batch itself: set "
            "trainer.use_distributed_sampler=false (trainer=ddp, ddp_cpu and fsdp do)."
        )
    return trainer.global_rank, trainer.world_size


class PairCollator:
    """Turns a list of row indices into ``{"queries": grouped features, "documents": grouped features}``.

    ``documents`` holds the batch's positives first (row ``i`` answers query ``i``), then all hard negatives.
    """

    def __init__(
        self,
        rows: Sequence[tuple[int, int, tuple[int, ...]]],
        queries: TokenizedTexts,
        documents: TokenizedTexts,
        length_groups: int = 1,
        query_ids: Sequence[str] = (),
    ):
        self.rows = rows
        self.query_ids = query_ids
        self.queries = queries
        self.documents = documents
        self.length_groups = length_groups

    def __call__(self, indices: Sequence[int]) -> dict[str, Any]:
        rows = [self.rows[i] for i in indices]
        doc_ids = [positive for _, positive, _ in rows] + [n for _, _, negatives in rows for n in negatives]
        return {
            "queries": self.queries.collate([query for query, _, _ in rows], self.length_groups),
            "documents": self.documents.collate(doc_ids, self.length_groups),
            "num_negatives": len(doc_ids) - len(rows),
            "query_ids": [self.query_ids[i] for i in indices] if self.query_ids else [],
        }


class ResumableDataModule(L.LightningDataModule):
    """Saves where in the epoch training is in checkpoints, so a resumed run skips what was trained on."""

    _resume_at: tuple[int, int] | None = None  # (epoch, batches done), set by load_state_dict

    def state_dict(self) -> dict[str, Any]:
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._resume_at = (state_dict["epoch"], state_dict["batches_done"])


class QAPairDataModule(ResumableDataModule):
    """Serves query/positive(/negatives) batches from a LlamaIndex ``.json`` or a ``.jsonl`` file.

    Texts are tokenized once, with the prompts and truncation of the LightningModule's encoder. Every epoch is
    reshuffled from the seed, and no batch holds the same query or document text twice.

    Args:
        train_path: training data (``.json`` = LlamaIndex EmbeddingQAFinetuneDataset, ``.jsonl`` = pairs, or a
            ``.csv`` / ``.parquet`` / ``datasets`` directory with one pair per row).
        val_path: validation data for IR evaluation (optional).
        batch_size: pairs per batch; each query sees ``batch_size - 1`` in-batch negatives.
        use_all_docs: False = one pair per query (its first relevant doc, as LlamaIndex); True = one per
            (query, relevant doc).
        max_negatives: cap on hard negatives per pair (None = all the data has).
        length_groups: pad each batch's texts in up to this many groups of similar length, so one long text
            does not pad the rest (1 = pad the whole batch to its longest text). Same texts, same loss.
        num_workers: DataLoader worker processes for collation.
        pin_memory: collate into page-locked memory, so copies to the GPU overlap compute (ignored on the CPU).
        seed: shuffling seed.
        drop_last: drop a final incomplete batch.
        columns: for .csv/.parquet/datasets-directory data, which column holds what, e.g.
            ``{"query": "question", "positive": "answer"}`` (unset roles: columns named query, positive, negatives).
    """

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        batch_size: int = 16,
        use_all_docs: bool = False,
        max_negatives: int | None = None,
        length_groups: int = 4,
        num_workers: int = 0,
        pin_memory: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        columns: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.train_path = train_path
        self.val_path = val_path
        self.batch_size = batch_size
        self.use_all_docs = use_all_docs
        self.max_negatives = max_negatives
        self.length_groups = length_groups
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.drop_last = drop_last
        self.columns = columns
        self.train_dataset: QADataset | None = None
        self.val_dataset: QADataset | None = None
        self._collator: PairCollator | None = None
        self._row_texts: list[tuple[int, ...]] = []
        self._examples: list[TrainingExample] = []

    def load_splits(self) -> tuple[QADataset, QADataset | None]:
        """Reads and validates the training and validation files."""
        if self.train_path is None:
            raise DataFormatError(
                "data.train_path is not set. Pass data.train_path=PATH (.json, .jsonl, .csv, .parquet or a "
                "datasets directory)."
            )
        train = load_dataset(self.train_path, self.columns)
        val = load_dataset(self.val_path, self.columns) if self.val_path else None
        return train, val

    def prepare_data(self) -> None:
        """Loads and checks the data; every data error surfaces here, before anything is trained or written."""
        if self.train_dataset is None:
            self.train_dataset, self.val_dataset = self.load_splits()
            self._examples = training_examples(self.train_dataset, self.use_all_docs)
            if len(self._examples) < self.batch_size:
                raise DataFormatError(
                    f"{self.source}: only {len(self._examples)} training pairs, fewer than one batch "
                    f"(data.batch_size={self.batch_size}). Add data or lower data.batch_size."
                )

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        if not self.tokenized:
            self.tokenize(self.trainer.lightning_module.encoder)

    @property
    def tokenized(self) -> bool:
        return self._collator is not None

    @property
    def num_rows(self) -> int:
        """Training rows (pairs, or pairs with their negatives); known after :meth:`tokenize`."""
        return len(self._row_texts)

    @property
    def source(self) -> str:
        return str(self.train_path)

    def tokenize(self, tokenizer: TextTokenizer) -> None:
        """Builds the training rows and tokenizes each distinct text once."""
        self.prepare_data()
        examples = self._examples
        if self.max_negatives is not None:
            examples = [
                TrainingExample(e.query, e.positive, e.negatives[: self.max_negatives], e.query_id) for e in examples
            ]
        query_texts = list(dict.fromkeys(e.query for e in examples))
        doc_texts = list(dict.fromkeys(t for e in examples for t in (e.positive, *e.negatives)))
        query_row = {t: i for i, t in enumerate(query_texts)}
        doc_row = {t: i for i, t in enumerate(doc_texts)}
        rows = [(query_row[e.query], doc_row[e.positive], tuple(doc_row[n] for n in e.negatives)) for e in examples]
        queries = TokenizedTexts(query_texts, "query", tokenizer)
        documents = TokenizedTexts(doc_texts, "document", tokenizer)
        self._collator = PairCollator(rows, queries, documents, self.length_groups, [e.query_id for e in examples])
        # Queries and documents live in separate id spaces: a query equal to a document is no clash.
        self._row_texts = [(q, *(len(query_texts) + d for d in (p, *n))) for q, p, n in rows]
        log.info(
            "%s: %d training pairs from %d queries and %d documents (tokenized once).",
            self.source,
            len(rows),
            len(query_texts),
            len(doc_texts),
        )

    def train_dataloader(self) -> DataLoader:
        sampler = self.batch_sampler(*distributed_position(self.trainer))
        return index_dataloader(self.num_rows, sampler, self.collator, self.num_workers, self.seed, self.pin_memory)

    @property
    def collator(self) -> PairCollator:
        assert self._collator is not None, "call setup() (Lightning does) or tokenize() first"
        return self._collator

    def batch_sampler(self, rank: int = 0, world: int = 1) -> NoDuplicatesBatchSampler:
        """This rank's batches: slices of global batches that hold no text twice (see NoDuplicatesBatchSampler)."""
        sampler = NoDuplicatesBatchSampler(
            self._row_texts, self.batch_size, self.seed, self.drop_last, num_replicas=world, rank=rank
        )
        if self._resume_at is not None:
            sampler.resume_at(*self._resume_at)
        return sampler


class StdlibDataModule(QAPairDataModule):
    """The offline default: docstring -> function-source pairs from this machine's Python standard library.

    Args:
        num_train: training pairs (None = all that remain after validation).
        num_val: validation queries.
        **kwargs: the :class:`QAPairDataModule` arguments (batch size, workers, seed, ...).
    """

    def __init__(self, num_train: int | None = 1500, num_val: int | None = 300, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_train = num_train
        self.num_val = num_val

    @property
    def source(self) -> str:
        return "stdlib dataset"

    def load_splits(self) -> tuple[QADataset, QADataset | None]:
        return build_stdlib_dataset(seed=self.seed, num_train=self.num_train, num_val=self.num_val)
