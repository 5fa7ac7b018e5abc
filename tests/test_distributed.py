"""DDP: cross-device negatives, global no-duplicate batches, and a real two-process run (gloo on the CPU)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import REPO, compose_train, tiny_run_overrides, write_toy_data
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy
from safetensors.torch import load_file
from torch import nn

from lit_embed.batch import Embedded, PackedTexts, PairBatch
from lit_embed.data.datamodule import distributed_position
from lit_embed.data.sampler import NoDuplicatesBatchSampler
from lit_embed.errors import LitEmbedError
from lit_embed.losses.gist import GISTLoss, gist
from lit_embed.losses.mnrl import DIRECTIONS, MultipleNegativesRankingLoss, mnrl
from lit_embed.training.checkpoint_io import load_checkpoint
from lit_embed.training.steps import GradCache

WORLD = 2


class ToyEncoder(nn.Module):
    """Token embeddings, mean over each text, a projection: enough to check gradients through a real encoder call."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(40, 8)
        self.projection = nn.Linear(8, 8)

    def forward(self, texts: PackedTexts) -> torch.Tensor:
        lengths = torch.tensor(texts.lengths)  # [n]
        owners = torch.repeat_interleave(torch.arange(len(texts)), lengths)  # [T]: the text each token is of
        tokens = self.embedding(texts.input_ids[0])  # [T, 8]
        sums = torch.zeros(len(texts), 8).index_add(0, owners, tokens)  # [n, 8]
        return self.projection(sums / lengths[:, None])  # [n, 8]

    def packs(self, texts: PackedTexts) -> bool:
        return True


def side(texts: list[list[int]]) -> PackedTexts:
    """Token-id lists packed into one row, as the collator builds a side of a batch."""
    return PackedTexts.from_tokens(torch.tensor([token for text in texts for token in text]), list(map(len, texts)))


def random_texts(count: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 7, (count,), generator=generator).tolist()
    return [torch.randint(1, 40, (n,), generator=generator).tolist() for n in lengths]


def gradients(encoder: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in encoder.parameters()]


def check_against_one_process(rank: int, queries_per_rank: list[int], num_negatives: int, cached: bool) -> None:
    """This rank's share of the batch with gathered negatives == one process on the whole batch (to 1e-5)."""
    total = sum(queries_per_rank)
    queries, positives = random_texts(total, 1), random_texts(total, 2)
    negatives = random_texts(total * num_negatives, 3)  # query i's negatives: rows i*k .. i*k + k - 1

    encoder = ToyEncoder()
    reference = mnrl(Embedded(encoder(side(queries)), encoder(side(positives + negatives))))
    reference.backward()
    expected = gradients(encoder)

    encoder.zero_grad()
    start, end = sum(queries_per_rank[:rank]), sum(queries_per_rank[: rank + 1])
    local = PairBatch(
        queries=side(queries[start:end]),
        documents=side(positives[start:end] + negatives[start * num_negatives : end * num_negatives]),
    )
    gathered = MultipleNegativesRankingLoss(gather_across_devices=True)
    if cached:
        loss = GradCache(gathered, mini_batch_size=2)(encoder, local, gathered)
    else:
        loss = gathered(local.embed(encoder))
    loss.backward()
    actual = gradients(encoder)
    for value in [*actual, loss := loss.detach()]:
        dist.all_reduce(value)  # DDP averages the gradients; the logged loss is the ranks' mean (sync_dist)
        value /= WORLD
    torch.testing.assert_close(loss, reference.detach(), atol=1e-5, rtol=0)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def gather_worker(rank: int, rendezvous: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        for queries_per_rank in ([4, 4], [3, 5]):  # equal halves, and a short last batch
            for num_negatives in (0, 1, 2):
                for cached in (False, True):
                    check_against_one_process(rank, queries_per_rank, num_negatives, cached)
    finally:
        dist.destroy_process_group()


def test_gathered_loss_and_gradients_equal_one_process_on_the_global_batch(tmp_path: Path) -> None:
    mp.spawn(gather_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD)


def embedding_leaves(rows: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_rank_share_of_global(
    rank: int, local_loss: torch.Tensor, leaves: list[torch.Tensor], reference: torch.Tensor, slices: list
) -> None:
    """This rank's gathered loss == one process on the global batch, whose loss is ``reference`` and whose leaves'
    rows ``slices`` are this rank's ``leaves``.

    DDP takes the mean of the ranks' losses and gradients. A gathered embedding's gradient already holds every rank's
    loss (the gather's backward sums them), so the global gradient of this rank's rows is it over the world size.
    """
    local_loss.backward()
    loss = local_loss.detach().clone()
    dist.all_reduce(loss)
    torch.testing.assert_close(loss / WORLD, reference.detach(), atol=1e-10, rtol=0)
    for leaf, (whole, rows) in zip(leaves, slices, strict=True):
        torch.testing.assert_close(leaf.grad / WORLD, whole.grad[rows], atol=1e-10, rtol=0)


def check_gathered_gist(rank: int, queries_per_rank: list[int], num_negatives: int) -> None:
    """loss=gist with gather_across_devices == one process on the global batch (no query-query candidates: as in
    sentence-transformers, a device's queries are candidates of its own queries only)."""
    total, start = sum(queries_per_rank), sum(queries_per_rank[:rank])
    size = queries_per_rank[rank]
    queries, positives = embedding_leaves(total, 8, 1), embedding_leaves(total, 8, 2)
    negatives = embedding_leaves(total * num_negatives, 8, 3)
    guide = [embedding_leaves(n, 6, seed) for n, seed in ((total, 4), (total, 5), (total * num_negatives, 6))]
    guide[1] = guide[0] + 0.8 * guide[1]  # positives the guide scores high, as a real guide would
    options = {"temperature": 0.05, "margin": 0.05, "contrast_anchors": False}
    whole = [t.clone().requires_grad_() for t in (queries, positives, negatives)]
    reference, masked = gist(whole[0], torch.cat(whole[1:]), guide[0], torch.cat(guide[1:]), **options)
    reference.backward()
    own = slice(start, start + size)
    own_negatives = slice(start * num_negatives, (start + size) * num_negatives)
    local = [
        t[rows].detach().clone().requires_grad_() for t, rows in zip(whole, (own, own, own_negatives), strict=True)
    ]
    loss = GISTLoss(gather_across_devices=True, **options)
    guide_documents = torch.cat([guide[1][own], guide[2][own_negatives]])
    local_loss = loss.guided_loss(local[0], torch.cat(local[1:]), guide[0][own], guide_documents)
    slices = [(whole[0], own), (whole[1], own), (whole[2], own_negatives)]
    assert_rank_share_of_global(rank, local_loss, local, reference, slices)
    counted = loss.step_metrics()["gist_masked"].clone()
    dist.all_reduce(counted)
    assert counted == masked > 0  # the guide dropped candidates, and the ranks counted each once


def check_gathered_gist_equals_sentence_transformers(rank: int, model_path: str) -> None:
    """With query-query candidates, the gathered loss is sentence-transformers' gathered GISTEmbedLoss."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss, gist_embed

    size, total = 4, 4 * WORLD  # sentence-transformers' offsets assume the same batch on every device
    own = slice(rank * size, (rank + 1) * size)
    student = [embedding_leaves(total, 8, seed)[own].requires_grad_() for seed in (1, 2, 3)]
    guide = [embedding_leaves(total, 6, seed)[own] for seed in (4, 5, 6)]
    guide[1] = guide[0] + 0.8 * guide[1]
    options = {"temperature": 0.05, "margin": 0.05, "gather_across_devices": True}
    model = SentenceTransformer(model_path, device="cpu")
    theirs = GISTEmbedLoss(model, SentenceTransformer(modules=list(model), device="cpu"), **options)
    gist_embed.embed_columns = lambda m, features: [(student if m is model else guide)[f["column"]] for f in features]
    expected = theirs([{"column": i} for i in range(3)], labels=None)
    ours = GISTLoss(**options).guided_loss(student[0], torch.cat(student[1:]), guide[0], torch.cat(guide[1:]))
    torch.testing.assert_close(ours, expected, atol=1e-10, rtol=0)


def check_gathered_directions_and_positives(rank: int, queries_per_rank: list[int], multi_positive: bool) -> None:
    """loss=mnrl with gather_across_devices, every direction or several positives per query, == one process."""
    total, start = sum(queries_per_rank), sum(queries_per_rank[:rank])
    size = queries_per_rank[rank]
    # Query q has one hard negative when q is even, and a second positive when q % 3 == 0 (multi_positive).
    negative_of = [q for q in range(total) if q % 2 == 0]
    second_of = [q for q in range(total) if q % 3 == 0] if multi_positive else []
    queries, positives = embedding_leaves(total, 8, 1), embedding_leaves(total, 8, 2)
    negatives, seconds = embedding_leaves(len(negative_of), 8, 3), embedding_leaves(len(second_of), 8, 4)
    whole = [t.clone().requires_grad_() for t in (queries, positives, negatives, seconds)]
    owners = torch.tensor(list(range(total)) + negative_of + second_of)
    marks = torch.tensor([True] * total + [False] * len(negative_of) + [True] * len(second_of))
    options = {"directions": ("query_to_doc",)} if multi_positive else {"directions": DIRECTIONS}
    everything = Embedded(whole[0], torch.cat(whole[1:]), owners, marks if multi_positive else None)
    reference = mnrl(everything, **options)
    reference.backward()
    # This rank's rows, laid out as the collator does: its positives, its negatives, its further positives.
    mine = [[q for q in of if start <= q < start + size] for of in (negative_of, second_of)]
    rows = [slice(start, start + size), slice(start, start + size)] + [
        [of.index(q) for q in picked] for of, picked in zip((negative_of, second_of), mine, strict=True)
    ]
    local = [t[r].detach().clone().requires_grad_() for t, r in zip(whole, rows, strict=True)]
    local_owners = torch.tensor([q - start for q in [*range(start, start + size), *mine[0], *mine[1]]])
    local_marks = torch.tensor([True] * size + [False] * len(mine[0]) + [True] * len(mine[1]))
    loss = MultipleNegativesRankingLoss(gather_across_devices=True, **options)
    local_loss = loss(Embedded(local[0], torch.cat(local[1:]), local_owners, local_marks if multi_positive else None))
    assert_rank_share_of_global(rank, local_loss, local, reference, list(zip(whole, rows, strict=True)))


def variants_worker(rank: int, rendezvous: str, model_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        for queries_per_rank in ([4, 4], [3, 5]):  # equal halves, and a short last batch
            for num_negatives in (0, 1):
                check_gathered_gist(rank, queries_per_rank, num_negatives)
            for multi_positive in (False, True):
                check_gathered_directions_and_positives(rank, queries_per_rank, multi_positive)
        check_gathered_gist_equals_sentence_transformers(rank, model_path)
    finally:
        dist.destroy_process_group()


def test_gathered_gist_directions_and_several_positives_equal_one_process(tmp_path: Path, tiny_model_path: str) -> None:
    mp.spawn(variants_worker, args=(str(tmp_path / "rendezvous"), tiny_model_path), nprocs=WORLD)


def test_without_a_process_group_gathering_is_the_plain_loss() -> None:
    q, d = torch.randn(4, 8), torch.randn(6, 8)
    assert MultipleNegativesRankingLoss(gather_across_devices=True)(Embedded(q, d)) == mnrl(Embedded(q, d))


def test_global_batches_hold_no_text_twice_and_every_rank_gets_a_slice() -> None:
    # 60 rows over 30 texts: many rows clash, so batches must be built around them.
    rows = [(i % 30, 100 + (i * 7) % 30) for i in range(60)]
    ranks = [NoDuplicatesBatchSampler(rows, batch_size=4, seed=5, num_replicas=WORLD, rank=r) for r in range(WORLD)]
    per_rank = [list(sampler) for sampler in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) > 0  # the same number of steps, or DDP would hang
    for step, global_batch in enumerate(ranks[0].global_batches()):
        assert per_rank[0][step] + per_rank[1][step] == global_batch
        assert all(per_rank[r][step] for r in range(WORLD))
        texts = [t for row in global_batch for t in rows[row]]
        assert len(texts) == len(set(texts)), f"a text repeats in global batch {step}"
    assert max(len(b) for b in ranks[0].global_batches()) == 4 * WORLD
    # The same batches as one process with the global batch size, less a last one too small to split.
    single = [batch for batch in NoDuplicatesBatchSampler(rows, batch_size=8, seed=5) if len(batch) >= WORLD]
    assert ranks[0].global_batches() == single


@pytest.mark.slow
def test_ddp_cpu_run_with_gathered_negatives_trains_like_one_process_on_the_global_batch(tmp_path: Path) -> None:
    """``python train.py trainer=ddp_cpu`` (2 gloo processes, 8 pairs each), with the plain and the cached loss,
    == one process with batches of 16."""
    train, val = write_toy_data(tmp_path)
    common = {
        "trainer.max_steps": 3,
        "model.model_name_or_path.dropout": 0.0,  # the ranks' dropout masks could not match one process's
        "eval.evaluation_steps": 0,
        "load_best_model_at_end": "false",  # compare the trained weights, whatever the toy metrics say
    }
    cached = {"loss": "cached_mnrl", "loss.loss.gather_across_devices": "true", "loss.mini_batch_size": 3}
    runs = {
        "ddp": ("ddp_cpu", {"loss.gather_across_devices": "true", "data.batch_size": 8}),
        "ddp_cached": ("ddp_cpu", {**cached, "data.batch_size": 8}),
        "single": ("cpu", {"data.batch_size": 16}),
    }
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    weights = {}
    for name, (trainer, extra) in runs.items():
        overrides = tiny_run_overrides(train, val, tmp_path / name, **common, **extra)
        overrides[overrides.index("trainer=cpu")] = f"trainer={trainer}"
        result = subprocess.run(
            [sys.executable, "train.py", *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
        weights[name] = load_file(tmp_path / name / "model" / "model.safetensors")
    assert (tmp_path / "ddp" / "metrics.json").is_file()
    for key, expected in weights["single"].items():
        for name in ("ddp", "ddp_cached"):
            torch.testing.assert_close(weights[name][key], expected, atol=1e-4, rtol=0, msg=f"{name}: {key}")


def sharded_worker(rank: int, rendezvous: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    from lit_embed.distributed import full_parameters

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        encoder = ToyEncoder()
        texts = side(random_texts(6, 4))
        with torch.no_grad():
            expected = encoder(texts)
        sharded = FullyShardedDataParallel(encoder, use_orig_params=True, device_id=torch.device("cpu"))
        with torch.no_grad():
            sharded(texts)  # FSDP shards lazily, at its first forward pass
        trainer = SimpleNamespace(strategy=SimpleNamespace(model=sharded))
        assert encoder.embedding.weight.dim() == 1, "FSDP should leave each rank only a flat shard"
        with full_parameters(trainer), torch.no_grad():
            torch.testing.assert_close(encoder(texts), expected)
    finally:
        dist.destroy_process_group()
    exit_passed_worker()


def exit_passed_worker() -> None:
    """Ends a spawned worker whose checks passed without the interpreter's teardown, where FSDP's gloo threads now and
    then abort the process ("terminate called without an active exception") after the work is done."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_full_parameters_gives_evaluation_and_export_the_whole_weights_under_fsdp(tmp_path: Path) -> None:
    mp.spawn(sharded_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD)


def clipping_worker(rank: int, rendezvous: str) -> None:
    from lightning.pytorch.plugins import Precision
    from torch.distributed.fsdp import FullyShardedDataParallel

    from lit_embed.training.module import EmbeddingFinetuneModule

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        texts = side(random_texts(6, 4))
        reference = ToyEncoder()  # one process: the same loss, clipped by the whole gradient's norm
        (reference(texts) ** 2).sum().mul(100).backward()
        assert torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5) > 0.5  # so that clipping changes it
        torch.optim.SGD(reference.parameters(), lr=1.0).step()

        sharded = FullyShardedDataParallel(ToyEncoder(), use_orig_params=True, device_id=torch.device("cpu"))
        (sharded(texts) ** 2).sum().mul(100).backward()  # every rank the same loss: FSDP's mean is the reference's
        optimizer = torch.optim.SGD(sharded.parameters(), lr=1.0)
        trainer = SimpleNamespace(precision_plugin=Precision(), strategy=SimpleNamespace(model=sharded))
        EmbeddingFinetuneModule.configure_gradient_clipping(SimpleNamespace(trainer=trainer), optimizer, 0.5, "norm")
        optimizer.step()
        with FullyShardedDataParallel.summon_full_params(sharded):
            for (name, expected), actual in zip(reference.named_parameters(), sharded.module.parameters(), strict=True):
                torch.testing.assert_close(actual, expected, msg=name)
    finally:
        dist.destroy_process_group()
    exit_passed_worker()


def test_gradient_norm_clipping_under_fsdp_takes_the_norm_of_the_whole_model(tmp_path: Path) -> None:
    """trainer=fsdp with the default trainer.gradient_clip_val: each rank holds a shard of every gradient, and the
    step must equal one process clipping the whole gradient (Lightning's FSDP plugin refuses norm clipping)."""
    mp.spawn(clipping_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD)


@pytest.mark.parametrize("trainer", ["ddp", "ddp_cpu", "fsdp"])
def test_distributed_trainer_configs_leave_the_batch_sharding_to_lit_embed(trainer: str) -> None:
    cfg = compose_train([f"trainer={trainer}"])
    assert cfg.trainer.use_distributed_sampler is False
    strategy = cfg.trainer.strategy
    if trainer == "fsdp":
        assert isinstance(instantiate(strategy), FSDPStrategy)
    else:
        assert strategy == "ddp_find_unused_parameters_true"
    assert cfg.trainer.accelerator == ("cpu" if trainer == "ddp_cpu" else "gpu")


def test_lightning_resharding_the_batches_is_refused_with_the_fix() -> None:
    trainer = SimpleNamespace(
        world_size=2, global_rank=1, _accelerator_connector=SimpleNamespace(use_distributed_sampler=True)
    )
    with pytest.raises(LitEmbedError, match="trainer.use_distributed_sampler=false"):
        distributed_position(trainer)
    trainer._accelerator_connector.use_distributed_sampler = False
    assert distributed_position(trainer) == (1, 2)


# --- a non-finite loss on one rank ---------------------------------------------------------------------------


def nonfinite_worker(rank: int, rendezvous: str) -> None:
    from lit_embed.training.nonfinite import nonfinite_on_host

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        finite = torch.tensor(0.5)
        assert nonfinite_on_host(finite, 3, 3, 0, [f"q{rank}"]) is None
        # Rank 1 alone has a NaN loss: both ranks find the step, with rank 1's batch, and skip it alike.
        loss = torch.tensor(float("nan")) if rank == 1 else finite
        skipped = nonfinite_on_host(loss, 4, 4, 0, [f"q{rank}a", f"q{rank}b"])
        assert skipped is not None and skipped.query_ids == ["q1a", "q1b"] and skipped.step == 4
        assert skipped.loss != skipped.loss  # NaN, rank 1's loss, on rank 0 too
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_nan_on_one_rank_is_found_on_every_rank(tmp_path: Path) -> None:
    mp.spawn(nonfinite_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD)


NAN_ON_RANK_1 = """
import os, sys
from lit_embed.losses.mnrl import MultipleNegativesRankingLoss
from lit_embed.train import main

original, calls = MultipleNegativesRankingLoss.forward, []


def forward(self, *args, **kwargs):
    loss = original(self, *args, **kwargs)
    calls.append(1)
    rank_1 = os.environ.get("LOCAL_RANK") == "1"  # Lightning's launcher starts rank 1 as this script again
    return loss * float("nan") if rank_1 and len(calls) == 2 else loss


MultipleNegativesRankingLoss.forward = forward
main()
"""


@pytest.mark.parametrize("skip", ["true", pytest.param("false", marks=pytest.mark.slow)])
def test_ddp_run_with_a_nan_on_one_rank_and_the_host_check_skips_or_stops_on_both(tmp_path: Path, skip: str) -> None:
    """An unfused optimizer is checked on the host: rank 1's NaN must stop or skip the step on rank 0 too, or one
    rank would wait in the gradient all-reduce for the other forever."""
    train, val = write_toy_data(tmp_path)
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    settings = {"optimizer.fused": "false", "method.skip_nonfinite": skip, "eval.evaluation_steps": 0}
    overrides = tiny_run_overrides(train, val, tmp_path / "run", **settings, **{"trainer.max_steps": 3})
    overrides[overrides.index("trainer=cpu")] = "trainer=ddp_cpu"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, str(script), *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    output = result.stdout + result.stderr
    if skip == "true":
        assert result.returncode == 0, output[-3000:]
        last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
        assert last["global_step"] == 3 and last["skipped_batches"] == 1
    else:
        assert result.returncode == 2, output[-3000:]
        assert re.search(r"the loss is nan at step 1 .*on the batch with query ids \['q\d+'", output), output[-3000:]
