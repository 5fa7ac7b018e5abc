"""LightningDataModules that serve tokenized (query, positive, negatives) batches as :class:`PairBatch`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from typing_extensions import Unpack

from lit_embed.batch import PackedTexts, PairBatch
from lit_embed.data.formats import dataset_rows, load_dataset, training_rows
from lit_embed.data.pairs import PairFormat
from lit_embed.data.ragged import Ragged
from lit_embed.data.rows import TrainingRows
from lit_embed.data.sampler import NoDuplicatesBatchSampler
from lit_embed.data.schema import QADataset
from lit_embed.data.settings import DataSettings, grouped
from lit_embed.data.stdlib import build_stdlib_dataset, check_split_sizes
from lit_embed.data.tokens import TextTokenizer, TokenizedTexts, tokenize_texts
from lit_embed.errors import DataFormatError, LitEmbedError
from lit_embed.internals import fit_position, uses_distributed_sampler

log = logging.getLogger(__name__)


class ResumableDataLoader(DataLoader):
    """A DataLoader that tells Lightning it resumes mid-epoch exactly, so Lightning does not warn that it cannot.

    The position is the data module's state (:class:`PairDataModule`), restored before the loader is built
    and applied by its batch sampler; the loader has nothing of its own to save.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def index_dataloader(
    num_rows: int,
    batch_sampler: Sampler[list[int]],
    collate_fn: Callable[[list[int]], Any],
    num_workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader that hands the batch sampler's row indices to ``collate_fn`` (which builds the features)."""
    return ResumableDataLoader(
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
    if uses_distributed_sampler(trainer):
        raise LitEmbedError(
            "under a distributed strategy lit_embed shards each global no-duplicates batch itself: set "
            "trainer.use_distributed_sampler=false (trainer=ddp, ddp_cpu and fsdp do)."
        )
    return trainer.global_rank, trainer.world_size


class PairCollator:
    """Turns a list of row indices into a :class:`PairBatch` (positives first, then all hard negatives).

    Args:
        rows: the training rows (text ids).
        queries: the tokenized query texts.
        documents: the tokenized document texts.
        length_groups: how the encoder computes each side: 0 = packed; ``g`` = padded in up to ``g`` length groups
            (see :class:`~lit_embed.batch.PackedTexts`).
        task: the name the batches carry.
        multi_positive: rows hold all their query's positives (``data.multi_positive``).
        pair_format: for a reranker, how it joins a query and a document (each batch then carries every query
            joined with each of its candidates, :attr:`PairBatch.pairs`); None: the batches are for an encoder.
        in_batch_negatives: for a reranker, the other queries' positives each query is also scored against (the
            next ones in the batch), after its own negatives.
    """

    def __init__(
        self,
        rows: TrainingRows,
        queries: TokenizedTexts,
        documents: TokenizedTexts,
        length_groups: int = 0,
        task: str = "",
        multi_positive: bool = False,
        pair_format: PairFormat | None = None,
        in_batch_negatives: int = 0,
    ):
        self.rows = rows
        self.queries = queries
        self.documents = documents
        self.length_groups = length_groups
        self.task = task
        self.multi_positive = multi_positive
        self.pair_format = pair_format
        self.in_batch_negatives = in_batch_negatives
        # A teacher's scores of each row's positive, then of each of its negatives (None: not every row has them).
        self.scores = rows.scores if rows.scores is not None and len(rows.negatives.values) else None

    def __call__(self, indices: Sequence[int]) -> PairBatch:
        rows = np.asarray(indices, dtype=np.int64)
        size = len(rows)
        negatives = self.rows.negatives.take(rows)
        doc_ids = np.concatenate([self.rows.positive[rows], negatives.values])
        # The batch row each document came with: positives, then the hard negatives, then further positives
        # last, so the first B + N rows keep the layout every loss reads.
        owners = np.concatenate([np.arange(size), np.repeat(np.arange(size), negatives.lengths)])
        extra: dict[str, Any] = {}
        if self.multi_positive:
            others = self.rows.other_positives.take(rows)
            doc_ids = np.concatenate([doc_ids, others.values])
            positives = torch.ones(len(doc_ids), dtype=torch.bool)  # [B + N + M]
            positives[size : len(owners)] = False  # the hard negatives
            owners = np.concatenate([owners, np.repeat(np.arange(size), others.lengths)])
            extra["positives"] = positives
        if self.pair_format is not None:
            extra |= self._pairs(rows, negatives, doc_ids)
        else:
            extra |= self._scored(rows, negatives)
        return PairBatch(
            queries=self._side(self.queries, self.rows.query[rows]),
            documents=self._side(self.documents, doc_ids),
            query_ids=self.rows.query_ids.texts(rows),
            task=self.task,
            document_rows=torch.from_numpy(owners),  # [B + N (+ M)]
            **extra,
        )

    def _side(self, texts: TokenizedTexts, indices: np.ndarray) -> PackedTexts:
        return texts.packed(indices, self.length_groups)

    def _scored(self, rows: np.ndarray, negatives: Ragged) -> dict[str, Any]:
        """The teacher's scores of the batch's rows and where their documents are: positives, then negatives.

        Rows are padded to the batch's most negatives ``k``: candidates -1 and scores NaN (see :class:`PairBatch`).
        """
        if self.scores is None:
            return {}
        size = len(rows)
        counts = torch.from_numpy(negatives.lengths)  # [B]
        real = torch.arange(1 + int(counts.max())) <= counts[:, None]  # [B, 1 + k]
        candidates = torch.full(real.shape, -1)
        candidates[:, 0] = torch.arange(size)
        # Row-major order of the mask is the documents' order: row i's negatives follow the B positives and the
        # negatives of rows before it.
        candidates[:, 1:][real[:, 1:]] = torch.arange(size, size + int(counts.sum()))
        scores = torch.full(real.shape, torch.nan)
        scores[real] = torch.from_numpy(self.scores.take(rows).values).float()
        return {"scores": scores, "candidates": candidates}  # both [B, 1 + k]

    def _pairs(self, rows: np.ndarray, negatives: Ragged, doc_ids: np.ndarray) -> dict[str, Any]:
        """A reranker's batch: each query's candidates (its positive, its negatives, then the next
        ``in_batch_negatives`` queries' positives) and every (query, candidate) pair joined as one sequence; the
        teacher's scores of its own candidates where the rows have them (NaN for the others)."""
        assert self.pair_format is not None
        size = len(rows)
        counts = torch.from_numpy(negatives.lengths)  # [B]
        own = torch.arange(1 + int(negatives.lengths.max(initial=0))) <= counts[:, None]  # [B, 1 + k]
        candidates = torch.full(own.shape, -1)
        candidates[:, 0] = torch.arange(size)
        candidates[:, 1:][own[:, 1:]] = torch.arange(size, size + int(counts.sum()))
        others = min(self.in_batch_negatives, size - 1)
        if others:  # the next queries' positives: distinct texts, since no batch holds a text twice
            shifted = (torch.arange(size)[:, None] + torch.arange(1, others + 1)) % size  # [B, others]
            candidates = torch.cat([candidates, shifted], dim=1)
        query_tokens = self.queries.features["input_ids"].take(self.rows.query[rows])
        document_tokens = self.documents.features["input_ids"].take(doc_ids)
        pairs = self.pair_format.pack(
            np.split(query_tokens.values, np.cumsum(query_tokens.lengths)[:-1]),
            np.split(document_tokens.values, np.cumsum(document_tokens.lengths)[:-1]),
            candidates.numpy(),
            self.queries.shared,
            self.length_groups,
        )
        batch: dict[str, Any] = {"pairs": pairs, "candidates": candidates}
        if self.scores is not None:
            scores = torch.full(candidates.shape, torch.nan)
            scores[:, : own.size(1)][own] = torch.from_numpy(self.scores.take(rows).values).float()
            batch["scores"] = scores
        return batch


class PairDataModule(L.LightningDataModule):
    """The base of every lit_embed data module: what a run may ask of its data, declared once, each with a default for
    a data module that cannot say. The training app, LightningCLI, the LightningModule, the callbacks and the model
    card read the data only through these; a data module of your own (``data._target_``, ``--data``) derives from this
    class, serves :class:`PairBatch` batches, and overrides what it knows.

    What it knows of its data is known after :meth:`prepare_data`, which the apps call before anything trains. It also
    saves where in the epoch training is in checkpoints, so that a resumed run skips what was trained on (its batch
    sampler applies :attr:`_resume_at`).

    Attributes:
        val_dataset: the validation set the IR evaluation scores (None: no validation).
        train_path: the training file, for the model card (None: the data is not read from one file).
        val_path: the validation file, for the model card (None: none, or a slice held out of the training data).
        batch_size: pairs per batch; ``"auto"``: the default recipe sets it before training (None: not one size).
        mine: the training app mines hard negatives for its rows before training (a QAPairDataModule's ``mine``).
        multi_positive: its rows hold every positive of their query (``data.multi_positive``).
        losses: a loss for each of its tasks (multi-task data); None: the run's ``loss``.
    """

    val_dataset: QADataset | None = None
    train_path: str | None = None
    val_path: str | None = None
    batch_size: int | str | None = None
    mine: bool = False
    multi_positive: bool = False
    losses: Mapping[str, nn.Module] | None = None
    _resume_at: tuple[int, int] | None = None  # (epoch, batches done), set by load_state_dict

    @property
    def source(self) -> str | None:
        """The training data, as messages and the model card name it (None: nothing to name)."""
        return None

    @property
    def num_training_pairs(self) -> int | None:
        """Training rows (pairs, or pairs with their negatives): what the default recipe sizes the run by (None: the
        module does not count them, and ``auto`` settings are refused)."""
        return None

    @property
    def has_teacher_scores(self) -> bool:
        """Whether the training rows carry a teacher's scores to distill."""
        return False

    def task_modules(self) -> list[PairDataModule]:
        """The data modules that batch the training rows, one per task: this one, for data of one task."""
        return [self]

    def training_texts(self) -> dict[str, dict[str, list[str]]]:
        """``{task: {"query": texts, "document": texts}}``: every distinct training text, for losses that work on
        them ahead of training (GIST's guide); empty: such a loss takes them batch by batch."""
        return {}

    def skipped_records(self) -> dict[str, dict[str, Any]]:
        """File -> what was left out of it as wrong on its own (for metrics.json); empty when nothing was."""
        return {}

    def data_identity(self) -> dict[str, dict[str, Any]]:
        """What the training rows were made from, by config path (``data``, ``data.tasks.NAME``): the source, the
        rows store's key (the file's bytes and the settings that shape the rows) and the number of pairs. Checkpoints
        keep it, so that a resume on other data is refused; empty: nothing to compare."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        if self.trainer is None:
            return {}
        at = fit_position(self.trainer)
        if at.epochs_started > at.epochs_processed or at.epochs_started == 0:  # within an epoch, or before the first
            return {"epoch": self.trainer.current_epoch, "batches_done": at.batches}
        # Training has stopped (max_epochs, max_steps, a signal) and Lightning has closed the epoch it stopped in,
        # whether or not its batches ran out: a longer run continues that epoch, or starts the next one.
        if at.last_batch:
            return {"epoch": at.epochs_processed, "batches_done": 0}
        return {"epoch": at.epochs_processed - 1, "batches_done": at.batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._resume_at = (state_dict["epoch"], state_dict["batches_done"])


def check_pair_data(data: Any, where: str) -> None:
    """Refuses a data module (or data module class) that is not a :class:`PairDataModule`, naming the fix."""
    kind = data if isinstance(data, type) else type(data)
    if not issubclass(kind, PairDataModule):
        raise LitEmbedError(
            f"{where}: {kind.__module__}.{kind.__qualname__} is not a lit_embed data module. Derive it from "
            "lit_embed.data.datamodule.PairDataModule, the LightningDataModule that declares what a run asks of its "
            "data (the validation set, the number of training pairs, what was skipped ...) with defaults, or train "
            "on your files with lit_embed.data.datamodule.QAPairDataModule."
        )


def trainer_data(trainer: L.Trainer) -> PairDataModule | None:
    """The data module ``trainer`` fits on (None: it fits on loaders of its own); any other is refused."""
    data = trainer.datamodule
    if data is not None:
        check_pair_data(data, "trainer.datamodule")
    return data


class QAPairDataModule(PairDataModule):
    """Serves query/positive(/negatives) batches from a LlamaIndex ``.json`` or a ``.jsonl`` file.

    Texts are tokenized once, with the prompts and truncation of the LightningModule's encoder. Every epoch is
    reshuffled from the seed, and no batch holds the same query or document text twice.

    Args:
        **settings: the config's flat keys, each checked by the record of :mod:`lit_embed.data.settings` that owns
            it: which rows the files give (``RowSettings``: ``train_path``, ``val_path``, ``val_fraction``,
            ``use_all_docs``, ``multi_positive``, ``max_negatives``, ``mine``), how they become batches
            (``BatchSettings``: ``batch_size``, ``max_tokens_per_batch``, ``length_groups``, ``packing``, ``seed``,
            ``drop_last``, ``num_workers``, ``pin_memory``) and how the files are read (``ReadSettings``:
            ``columns``, ``max_skipped``, ``strict``, ``cache_dir``, ``cache_lock``).
    """

    def __init__(self, **settings: Unpack[DataSettings]) -> None:
        super().__init__()
        self.row_settings, self.batch_settings, self.read_settings = grouped(settings)
        self.task = ""  # set by a multi-task data module: the name its batches carry
        self.train_rows: TrainingRows | None = None
        self.val_dataset: QADataset | None = None
        self._collator: PairCollator | None = None
        self._row_texts: Ragged | None = None
        self._distinct_texts: Ragged | None = None
        self._row_tokens: np.ndarray | None = None

    # What every data module declares (PairDataModule), read from the records.
    @property
    def train_path(self) -> str | None:
        return self.row_settings.train_path

    @property
    def val_path(self) -> str | None:
        return self.row_settings.val_path

    @property
    def mine(self) -> bool:
        return self.row_settings.mine

    @property
    def multi_positive(self) -> bool:
        return self.row_settings.multi_positive

    @property
    def batch_size(self) -> int | str:
        return self.batch_settings.batch_size

    @batch_size.setter
    def batch_size(self, size: int) -> None:
        """The default recipe's batch size, for ``batch_size="auto"``."""
        self.batch_settings = dataclasses.replace(self.batch_settings, batch_size=size)

    def load_rows(self) -> TrainingRows:
        """The training rows, converted from the training file once (see :func:`training_rows`)."""
        if self.train_path is None:
            raise DataFormatError(
                "data.train_path is not set. Pass data.train_path=PATH (.json, .jsonl, .csv, .parquet or a "
                "datasets directory)."
            )
        read, all_docs = self.read_settings, self.row_settings.use_all_docs
        return training_rows(
            self.train_path,
            read.columns,
            read.skip_policy,
            all_docs,
            self.multi_positive,
            read.cache_dir,
            read.cache_lock,
        )

    def load_validation(self) -> QADataset | None:
        """The validation set, read whole (evaluation embeds its corpus in chunks)."""
        if not self.val_path:
            return None
        val = load_dataset(self.val_path, self.read_settings.columns, self.read_settings.skip_policy)
        if not val.queries:
            raise DataFormatError(
                f"{self.val_path}: no validation queries. Add queries with their relevant documents, or leave "
                "data.val_path unset to train without validation."
            )
        return val

    def prepare_data(self) -> None:
        """Loads and checks the data; every data error surfaces here, before anything is trained or written."""
        if self.train_rows is None:
            rows = self.load_rows()
            self.val_dataset = self.load_validation()
            if self.val_dataset is None and self.row_settings.val_fraction > 0:
                rows, self.val_dataset = rows.hold_out(
                    self.row_settings.val_fraction, self.batch_settings.seed, self.source
                )
            if not len(rows):
                raise DataFormatError(
                    f"{self.source}: no training pairs: no record has a query with a relevant document. Add pairs "
                    "to the file, or point data.train_path at the right one."
                )
            if self.batch_size != "auto" and len(rows) < self.batch_size:
                raise DataFormatError(
                    f"{self.source}: only {len(rows)} training pairs, fewer than one batch "
                    f"(data.batch_size={self.batch_size}). Add data or lower data.batch_size."
                )
            self.train_rows = rows.trimmed(self.row_settings.max_negatives)
            self._log_rows_without_negatives()

    @property
    def rows(self) -> TrainingRows:
        assert self.train_rows is not None, "call prepare_data() (Lightning does) first"
        return self.train_rows

    def use_hard_negatives(self, negatives: Ragged) -> None:
        """Trains on these hard negatives (a row of document numbers for each distinct query of :attr:`rows`, e.g.
        mined) instead of the file's own."""
        assert not self.tokenized, "hard negatives change the rows: set them before tokenize()"
        self.prepare_data()
        rows = self.rows.with_query_negatives(negatives)
        self.train_rows = rows.trimmed(self.row_settings.max_negatives)

    @property
    def has_teacher_scores(self) -> bool:
        """Whether the training rows carry teacher scores to distill (known after :meth:`prepare_data`).

        Every row needs scores, and at least one row a hard negative: scores of positives alone compare nothing.
        """
        return self._all_scored and len(self.rows.negatives.values) > 0

    @property
    def _all_scored(self) -> bool:
        return self.train_rows is not None and self.train_rows.scores is not None

    def _log_rows_without_negatives(self) -> None:
        """Says how many scored rows have no hard negative: they give the distillation losses nothing.

        The data cannot know the loss, so this is a log line; a distillation loss refuses scores that no row can
        use before training (``check_distillation_data``), while other losses train on such data as usual.
        """
        if not self._all_scored:
            return
        without = int((self.rows.negatives.lengths == 0).sum())
        if without == len(self.rows):
            fix = "raise data.max_negatives from 0"
            if self.row_settings.max_negatives != 0:
                fix = "mine them with lit-embed-mine, then score them with lit-embed-score"
            log.info(
                "%s: none of the %d training rows has a hard negative, so their teacher scores are not used "
                "(loss=margin_mse and kl_distill need negatives: %s).",
                self.source,
                without,
                fix,
            )
        elif without:
            log.info(
                "%s: %d of %d training rows have no hard negatives: they add nothing to loss=margin_mse or kl_distill.",
                self.source,
                without,
                len(self.rows),
            )

    def skipped_records(self) -> dict[str, dict[str, Any]]:
        splits = ((self.train_path, self.train_rows), (self.val_path, self.val_dataset))
        return {str(path): data.skipped.as_dict() for path, data in splits if data is not None and data.skipped}

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        if not self.tokenized:
            module = self.trainer.lightning_module
            loss = module.loss_for(self.task) if hasattr(module, "loss_for") else None
            self.tokenize(module.encoder, getattr(loss, "in_batch_negatives", 0))

    @property
    def tokenized(self) -> bool:
        return self._collator is not None

    @property
    def num_training_pairs(self) -> int:
        """Training rows (pairs, or pairs with their negatives), known after :meth:`prepare_data`: what the default
        recipe sizes the run by."""
        return len(self.rows)

    @property
    def source(self) -> str:
        return str(self.train_path)

    def data_identity(self) -> dict[str, dict[str, Any]]:
        where = f"data.tasks.{self.task}" if self.task else "data"
        return {where: {"source": self.source, "rows": self.rows.key, "pairs": len(self.rows)}}

    def tokenize(self, tokenizer: TextTokenizer, in_batch_negatives: int = 0) -> None:
        """Tokenizes each distinct text of the training rows once (or opens the token store of an earlier run).

        A reranker (a tokenizer with a ``pair_format``) gets batches of (query, candidate) pairs, each query scored
        against ``in_batch_negatives`` other queries' positives besides its own candidates.
        """
        self.prepare_data()
        rows = self.rows
        cache, lock = self.read_settings.cache_dir, self.read_settings.cache_lock
        queries = tokenize_texts(rows.queries, "query", tokenizer, rows.key, cache, cache_lock=lock)
        documents = tokenize_texts(rows.documents, "document", tokenizer, rows.key, cache, cache_lock=lock)
        packed = self._packs(tokenizer, queries, documents)
        length_groups = 0 if packed else self.batch_settings.length_groups
        pair_format: PairFormat | None = getattr(tokenizer, "pair_format", None)
        self._collator = PairCollator(
            rows, queries, documents, length_groups, self.task, self.multi_positive, pair_format, in_batch_negatives
        )
        self._row_texts = rows.row_texts()
        # What no batch may hold twice: every text of a row, which an encoder scores against every query of the
        # batch; a reranker scores a row's negatives with its own query only, and other rows' positives.
        self._distinct_texts = self._row_texts.head(2) if pair_format is not None else self._row_texts
        self._row_tokens = (
            self._tokens_per_row(queries, documents, pair_format) if self.batch_settings.max_tokens_per_batch else None
        )
        log.info(
            "%s: %d training pairs from %d queries and %d documents (tokenized once; batches %s).",
            self.source,
            len(rows),
            len(np.unique(rows.query)),  # not the held-out ones
            len(rows.documents),
            "packed, no padding" if packed else "padded in length groups",
        )

    def _tokens_per_row(
        self, queries: TokenizedTexts, documents: TokenizedTexts, pair_format: PairFormat | None = None
    ) -> np.ndarray:
        """Each training row's tokens (query, positives and negatives; for a reranker, its query joined with each of
        its documents); refuses a row over the token budget."""
        lengths = np.concatenate([queries.lengths, documents.lengths])  # the id space of row_texts
        texts = self._row_texts
        counts = lengths[np.asarray(texts.values)]  # each row's texts: its query first, then its documents
        tokens = np.add.reduceat(counts, texts.offsets[:-1])
        if pair_format is not None:  # each document joined with the query and the template, cut to max_length
            row = np.repeat(np.arange(len(texts)), texts.lengths)
            document = np.ones(len(counts), dtype=bool)
            document[texts.offsets[:-1]] = False
            query = counts[texts.offsets[:-1]][row[document]]
            joined = np.minimum(query + counts[document] + pair_format.special_tokens, pair_format.max_length)
            tokens = np.bincount(row[document], weights=joined, minlength=len(texts)).astype(np.int64)
        longest = int(np.argmax(tokens))
        budget = self.batch_settings.max_tokens_per_batch
        if tokens[longest] > budget:
            count = int(texts.lengths[longest]) - 1
            raise LitEmbedError(
                f"{self.source}, {self.rows.query_ids.text(longest)}: this training row holds {tokens[longest]} "
                f"tokens (its query and {count} document{'s' * (count != 1)}), more than "
                f"data.max_tokens_per_batch={budget}. Raise data.max_tokens_per_batch to at "
                f"least {tokens[longest]} (a few rows' worth, for in-batch negatives), or lower data.max_negatives "
                "or model.max_seq_length."
            )
        return tokens

    def _packs(self, tokenizer: TextTokenizer, *sides: TokenizedTexts) -> bool:
        """Whether batches are packed (see ``packing``); says why not when the encoder cannot pack."""
        if self.batch_settings.packing is False:
            return False
        reason = tokenizer.packing_unsupported
        if reason is None and any(set(side.features) != {"input_ids"} for side in sides):
            reason = "its token store holds more than token ids"
        if reason is not None:
            (log.warning if self.batch_settings.packing is True else log.info)(
                "data.packing=%s: this encoder cannot embed packed texts: %s. Batches are padded in length groups.",
                str(self.batch_settings.packing).lower(),
                reason,
            )
        return reason is None

    def training_texts(self) -> dict[str, dict[str, list[str]]]:
        """``{task: {"query": texts, "document": texts}}``: every distinct training text, for losses that work on
        them ahead of training (GIST's guide)."""
        sides = {"query": self.collator.queries.texts, "document": self.collator.documents.texts}
        return {self.task: {kind: texts.texts(range(len(texts))) for kind, texts in sides.items()}}

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.batch_sampler(*distributed_position(self.trainer)))

    def loader(self, batch_sampler: Sampler[list[int]]) -> DataLoader:
        """The loader of the batches ``batch_sampler`` draws from the training rows."""
        batching = self.batch_settings
        return index_dataloader(
            len(self.rows), batch_sampler, self.collator, batching.num_workers, batching.seed, batching.pin_memory
        )

    @property
    def collator(self) -> PairCollator:
        assert self._collator is not None, "call setup() (Lightning does) or tokenize() first"
        return self._collator

    def batch_sampler(self, rank: int = 0, world: int = 1) -> NoDuplicatesBatchSampler:
        """This rank's batches: slices of global batches that hold no text twice (see NoDuplicatesBatchSampler)."""
        assert self._distinct_texts is not None, "call setup() (Lightning does) or tokenize() first"
        sampler = NoDuplicatesBatchSampler(
            self._distinct_texts,
            self.batch_size,
            self.batch_settings.seed,
            self.batch_settings.drop_last,
            num_replicas=world,
            rank=rank,
            row_tokens=self._row_tokens,
            max_tokens=self.batch_settings.max_tokens_per_batch,
        )
        if self._resume_at is not None:
            sampler.resume_at(*self._resume_at)
        return sampler


class StdlibDataModule(QAPairDataModule):
    """The offline default: docstring -> function-source pairs from this machine's Python standard library.

    Args:
        num_train: training pairs (None = all that remain after validation).
        num_val: validation queries.
        **settings: the :class:`QAPairDataModule` settings (batch size, workers, seed, ...).
    """

    def __init__(
        self, num_train: int | None = 1500, num_val: int | None = 300, **settings: Unpack[DataSettings]
    ) -> None:
        super().__init__(**settings)
        for key in ("train_path", "val_path"):
            if getattr(self, key) is not None:
                raise LitEmbedError(
                    f"data.{key} is set, but data=stdlib builds its own data from the standard library: train on "
                    f"your files with data=qa_json data.train_path=... data.val_path=..."
                )
        check_split_sizes(num_train, num_val)
        self.num_train = num_train
        self.num_val = num_val
        self._val: QADataset | None = None  # built with the training split

    @property
    def source(self) -> str:
        return "stdlib dataset"

    def load_rows(self) -> TrainingRows:
        train, val = build_stdlib_dataset(seed=self.batch_settings.seed, num_train=self.num_train, num_val=self.num_val)
        self._val = val if val.queries else None  # num_val=0: no validation
        read = self.read_settings
        return dataset_rows(train, self.row_settings.use_all_docs, self.multi_positive, read.cache_dir, read.cache_lock)

    def load_validation(self) -> QADataset | None:
        return self._val
