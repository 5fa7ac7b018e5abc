"""Multi-task data: several datasets, each with its own loss, interleaved in one run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import compose_train, toy_split, write_toy_data
from test_checkpointing import SimulatedCrash, crash_before_step, encoder_weights

from lit_embed.data.sampler import NoDuplicatesBatchSampler, TaskSchedule
from lit_embed.errors import LitEmbedError
from lit_embed.train import run


def schedule(mode: str, rows: tuple[int, ...] = (12, 6), batch_size: int = 3, seed: int = 0) -> TaskSchedule:
    samplers = [NoDuplicatesBatchSampler([(i,) for i in range(n)], batch_size, seed=seed) for n in rows]
    return TaskSchedule(samplers, offsets=[0, rows[0]], mode=mode, seed=seed)


def tasks_of(batches: list[list[int]], first_of_task_1: int = 12) -> list[int]:
    return [int(batch[0] >= first_of_task_1) for batch in batches]


def test_round_robin_alternates_until_a_task_runs_out() -> None:
    batches = list(schedule("round_robin"))
    assert tasks_of(batches) == [0, 1] * 2  # task 1 has 2 batches of 3
    assert all(len(set(tasks_of([[i] for i in batch]))) == 1 for batch in batches), "a batch mixes tasks"


def test_proportional_uses_every_batch_once_in_a_seeded_order() -> None:
    sampler = schedule("proportional", rows=(30, 9))
    first = list(sampler)
    assert sorted(tasks_of(first, 30)) == [0] * 10 + [1] * 3
    assert sorted(i for b in first for i in b) == list(range(39))
    assert list(sampler) == first  # the same epoch again
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_sequential_runs_task_after_task() -> None:
    assert tasks_of(list(schedule("sequential"))) == [0, 0, 0, 0, 1, 1]


def test_resume_skips_the_steps_done() -> None:
    sampler = schedule("proportional", rows=(30, 9))
    sampler.set_epoch(2)
    whole = list(sampler)
    resumed = schedule("proportional", rows=(30, 9))
    resumed.resume_at(2, 5)
    assert list(resumed) == whole[5:]


def write_triplets(path: Path, count: int = 30) -> Path:
    """``{"query", "positive", "negatives"}`` lines whose negative is another query's positive."""
    split = toy_split(count, offset=2000)
    ids = list(split.queries)
    with path.open("w") as lines:
        for i, query in enumerate(ids):
            positive = split.corpus[split.relevant_docs[query][0]]
            negative = split.corpus[split.relevant_docs[ids[(i + 1) % count]][0]]
            lines.write(json.dumps({"query": split.queries[query], "positive": positive, "negatives": [negative]}))
            lines.write("\n")
    return path


def multitask_overrides(tmp_path: Path, output_dir: Path, mode: str, **extra: object) -> list[str]:
    train, val = write_toy_data(tmp_path)  # 48 QA pairs
    triplets = write_triplets(tmp_path / "triplets.jsonl")  # 30 triplets
    values: dict[str, object] = {
        "data.mode": mode,
        "data.tasks.qa.data.train_path": train,
        "data.tasks.qa.data.batch_size": 8,
        "data.tasks.triplets.data.train_path": triplets,
        "data.tasks.triplets.data.batch_size": 6,
        "data.val_path": val,
        "optimizer.lr": 1e-3,
        "trainer.log_every_n_steps": 1,
        "output_dir": output_dir,
        **extra,
    }
    return ["model=tiny", "trainer=cpu", "data=multitask"] + [f"{k}={v}" for k, v in values.items()]


def logged(output_dir: Path) -> list[dict[str, str]]:
    (metrics_file,) = output_dir.glob("logs/**/metrics.csv")
    with metrics_file.open() as rows:
        return list(csv.DictReader(rows))


@pytest.mark.parametrize(
    ("mode", "steps", "tasks_per_step"),
    [("round_robin", 10, 1), ("sequential", 11, 1), ("max_size_cycle", 6, 2), ("min_size", 5, 2)],
)
def test_each_task_trains_with_its_own_loss(tmp_path: Path, mode: str, steps: int, tasks_per_step: int) -> None:
    # 48 QA pairs / 8 = 6 batches; 30 triplets / 6 = 5 batches.
    output_dir = tmp_path / "run"
    metrics = run(compose_train(multitask_overrides(tmp_path, output_dir, mode, **{"trainer.max_epochs": 1})))
    assert metrics["base"] and (output_dir / "model").is_dir()
    rows = [row for row in logged(output_dir) if row.get("train/loss")]
    assert int(rows[-1]["step"]) == steps - 1
    for row in rows:
        per_task = [float(row[f"train/loss/{task}"]) for task in ("qa", "triplets")]
        per_task = [value for value in per_task if value == value]  # NaN: the task had no batch this step
        assert len(per_task) == tasks_per_step
        assert float(row["train/loss"]) == pytest.approx(sum(per_task), rel=1e-5)


def test_resumed_multitask_run_ends_with_the_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = {"trainer.max_steps": 7, "trainer.max_epochs": 2, "checkpoint.save_steps": 1, "eval.evaluation_steps": 0}
    run(compose_train(multitask_overrides(tmp_path, tmp_path / "straight", "proportional", **settings)))
    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        crash_before_step(patch, 3)
        with pytest.raises(SimulatedCrash):
            run(compose_train(multitask_overrides(tmp_path, interrupted, "proportional", **settings)))
    run(compose_train(multitask_overrides(tmp_path, interrupted, "proportional", resume="true", **settings)))
    expected = encoder_weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    actual = encoder_weights(interrupted / "checkpoints" / "last.ckpt")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0, msg=key)


def test_a_task_without_a_loss_is_refused(tmp_path: Path) -> None:
    overrides = multitask_overrides(tmp_path, tmp_path / "run", "round_robin", **{"~data.tasks.qa.loss": None})
    with pytest.raises(LitEmbedError, match="data.tasks.qa needs"):
        run(compose_train([o.replace("=None", "") for o in overrides]))
