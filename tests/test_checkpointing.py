"""Checkpoint retention, exact resume, best-model export, atomic writes and safe loading."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import compose_train, tiny_run_overrides, write_toy_data
from sentence_transformers import SentenceTransformer
from sentence_transformers.evaluation import InformationRetrievalEvaluator

from lit_embed.data.formats import load_dataset
from lit_embed.errors import LitEmbedError
from lit_embed.train import run
from lit_embed.training.checkpoint_io import load_checkpoint
from lit_embed.training.lifecycle import mark_run_folder
from lit_embed.training.module import EmbeddingFinetuneModule


class SimulatedCrash(RuntimeError):
    pass


def crash_before_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Makes training die right before optimizer step ``step + 1``, after step ``step`` was checkpointed."""

    def on_train_batch_start(self, batch, batch_idx):
        if self.trainer.global_step == step:
            raise SimulatedCrash(f"killed after step {step}")

    monkeypatch.setattr(EmbeddingFinetuneModule, "on_train_batch_start", on_train_batch_start, raising=False)


def encoder_weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_checkpoint(path)["state_dict"].items() if k.startswith("encoder.")}


@pytest.mark.parametrize("crash_step", [3, 6])  # mid-epoch, and exactly at an epoch boundary (6 batches/epoch)
def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_step: int
) -> None:
    train, val = write_toy_data(tmp_path)  # 48 pairs / batch 8 = 6 batches per epoch
    settings = {"trainer.max_epochs": 2, "trainer.max_steps": 9, "checkpoint.save_steps": 1, "eval.evaluation_steps": 3}
    straight = run(compose_train(tiny_run_overrides(train, val, tmp_path / "straight", **settings)))

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        crash_before_step(patch, crash_step)
        with pytest.raises(SimulatedCrash):
            run(compose_train(tiny_run_overrides(train, val, interrupted, **settings)))
    assert not (interrupted / "model").exists()
    assert load_checkpoint(interrupted / "checkpoints" / "last.ckpt")["global_step"] == crash_step

    resumed = run(compose_train(tiny_run_overrides(train, val, interrupted, resume="true", **settings)))

    expected = encoder_weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    actual = encoder_weights(interrupted / "checkpoints" / "last.ckpt")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0, msg=key)
    assert resumed == straight  # base numbers survive the resume; final = same step, same metrics


def batches_and_rates(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, tuple[str, ...], float]]:
    """Records (step, the batch's query ids, the learning rate it trains with) for every training step."""
    steps = []
    training_step = EmbeddingFinetuneModule.training_step

    def spy(self, batch, batch_idx):
        steps.append((self.global_step, tuple(batch.query_ids), self.optimizers().param_groups[0]["lr"]))
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(EmbeddingFinetuneModule, "training_step", spy)
    return steps


@pytest.mark.parametrize(
    ("first", "longer", "scheduler"),
    [
        ({"trainer.max_epochs": 1}, {"trainer.max_epochs": 2}, "null"),  # 6 batches per epoch
        ({"trainer.max_epochs": 1}, {"trainer.max_epochs": 2}, "linear"),
        ({"trainer.max_steps": 6}, {"trainer.max_steps": 12}, "null"),  # stopped by max_steps at an epoch's end
        ({"trainer.max_steps": 9}, {"trainer.max_steps": 15}, "null"),  # ... and within one
    ],
    ids=["epochs", "epochs-linear-schedule", "steps-at-epoch-end", "steps-mid-epoch"],
)
def test_a_finished_run_resumed_longer_trains_what_one_longer_run_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: dict, longer: dict, scheduler: str
) -> None:
    train, _ = write_toy_data(tmp_path)
    settings = {"trainer.max_steps": -1, "trainer.max_epochs": -1, "checkpoint.save_steps": 0}
    if scheduler == "null":
        settings["scheduler"] = "null"
    steps = batches_and_rates(monkeypatch)
    run(compose_train(tiny_run_overrides(train, None, tmp_path / "straight", **{**settings, **longer})))
    straight, _ = steps[:], steps.clear()

    out = tmp_path / "extended"
    run(compose_train(tiny_run_overrides(train, None, out, **{**settings, **first})))
    trained = len(steps)
    run(compose_train(tiny_run_overrides(train, None, out, **{**settings, **longer}, resume="true", overwrite="true")))

    assert len(steps) > trained
    assert load_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == len(straight)
    assert [batch for _, batch, _ in steps] == [batch for _, batch, _ in straight]  # the same data order
    if scheduler == "null":  # a constant learning rate: the same run, bit for bit
        expected = encoder_weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")
        actual = encoder_weights(out / "checkpoints" / "last.ckpt")
        assert all(torch.equal(actual[key], expected[key]) for key in expected)
    else:  # the schedule spans the longer run from the step reached: the added steps train at the longer run's rates
        assert [lr for *_, lr in steps[trained:]] == [lr for *_, lr in straight[trained:]]
        assert all(lr > 0 for *_, lr in steps[trained:])


def test_resuming_with_the_length_already_trained_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    train, _ = write_toy_data(tmp_path)
    out = tmp_path / "run"
    length = {"trainer.max_steps": 8, "trainer.max_epochs": -1}  # 6 batches per epoch
    run(compose_train(tiny_run_overrides(train, None, out, **length)))
    last = out / "checkpoints" / "last.ckpt"
    written = last.stat().st_mtime_ns

    run(compose_train(tiny_run_overrides(train, None, out, resume="true", overwrite="true", **length)))
    said = "has trained 8 steps (1 epoch and 2 batches), all that trainer.max_steps=8 allows: nothing is left to train"
    assert said in caplog.text
    assert last.stat().st_mtime_ns == written  # nothing trained, nothing saved

    for shorter in ({"trainer.max_steps": 3}, {"trainer.max_steps": -1, "trainer.max_epochs": 1}):
        with pytest.raises(LitEmbedError, match=r"has trained 8 steps .*, past trainer.max_\w+=\d, and a run cannot"):
            run(compose_train(tiny_run_overrides(train, None, out, resume="true", overwrite="true", **shorter)))


def test_retention_keeps_the_newest_and_the_best(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train, val = write_toy_data(tmp_path)
    # A monitor that is best at step 1 and worse afterwards, so the retention limit would delete it.
    from lit_embed.training.callbacks.ir_eval import IREvaluationCallback

    def on_train_batch_end(self, trainer, pl_module, *args):
        trainer.callback_metrics["val/score"] = torch.tensor(-float(trainer.global_step))

    monkeypatch.setattr(IREvaluationCallback, "on_train_batch_end", on_train_batch_end)
    out = tmp_path / "run"
    overrides = {"trainer.max_steps": 6, "checkpoint.save_steps": 1, "checkpoint.save_total_limit": 2}
    overrides["checkpoint.monitor"] = "val/score"
    run(compose_train(tiny_run_overrides(train, val, out, **overrides)))

    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step=1.ckpt", "step=5.ckpt", "step=6.ckpt"]
    assert load_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 6
    assert json.loads((out / "metrics.json").read_text())["final"]["step"] == 1  # the best, not the last


def test_a_final_evaluation_after_the_last_save_can_still_make_it_the_best(tmp_path: Path, monkeypatch) -> None:
    train, val = write_toy_data(tmp_path)
    # A monitor that grows with the step, evaluated only before training and at its end, which is also a save step:
    # the step was checkpointed before its evaluation made it the best.
    from lit_embed.training.callbacks.ir_eval import IREvaluationCallback

    evaluate = IREvaluationCallback._evaluate

    def scored_by_step(self, trainer, pl_module):
        evaluate(self, trainer, pl_module)
        trainer.callback_metrics["val/score"] = torch.tensor(float(trainer.global_step))

    monkeypatch.setattr(IREvaluationCallback, "_evaluate", scored_by_step)
    out = tmp_path / "run"
    overrides = {"trainer.max_steps": 4, "checkpoint.save_steps": 4, "eval.evaluation_steps": 100}
    overrides |= {"checkpoint.monitor": "val/score", "merge.alphas": "[1.0]"}
    metrics = run(compose_train(tiny_run_overrides(train, val, out, **overrides)))
    assert metrics["final"]["step"] == 4
    state = load_checkpoint(out / "checkpoints" / "last.ckpt")["callbacks"]
    assert next(s["best"]["step"] for key, s in state.items() if "StepCheckpoint" in key) == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt", "step=4.ckpt"]


def test_exported_model_is_the_best_checkpoint_and_metrics_match_sentence_transformers(tmp_path: Path) -> None:
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "run"
    metrics = run(compose_train(tiny_run_overrides(train, val, out, **{"eval.evaluation_steps": 1})))
    best = load_checkpoint(out / "checkpoints" / "last.ckpt")["callbacks"]
    best_step = next(state["best"]["step"] for key, state in best.items() if "StepCheckpoint" in key)
    assert metrics["final"]["step"] == best_step

    data = load_dataset(val)
    evaluator = InformationRetrievalEvaluator(data.queries, data.corpus, data.relevant_docs, name="val")
    reference = evaluator(SentenceTransformer(str(out / "model"), device="cpu"))
    for key, value in metrics["final"].items():
        if key != "step":
            assert value == pytest.approx(reference[f"val_cosine_{key}"], abs=1e-4), key


def test_export_command_writes_the_checkpoint_model(tmp_path: Path) -> None:
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "run"
    run(compose_train(tiny_run_overrides(train, val, out, load_best_model_at_end="false")))
    target = tmp_path / "exported"
    cmd = [sys.executable, "-m", "lit_embed.export", str(out / "checkpoints" / "last.ckpt"), str(target)]
    subprocess.run(cmd, check=True, capture_output=True)
    texts = ["how do I parse json?", "def helper(): return 1"]
    exported = SentenceTransformer(str(target), device="cpu").encode(texts, convert_to_tensor=True)
    final = SentenceTransformer(str(out / "model"), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(exported, final, atol=1e-6, rtol=0)


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from lit_embed.training.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    def torch_save_that_dies(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torch_save_that_dies)
    with pytest.raises(LitEmbedError, match=r"could not write checkpoint .*No space left on device.*intact"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_failed_model_export_keeps_the_previous_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_encoder):
    from lit_embed.models.saving import to_sentence_transformers

    to_sentence_transformers(tiny_encoder, tmp_path / "model")
    before = (tmp_path / "model" / "model.safetensors").read_bytes()

    def save_that_dies(path):
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tiny_encoder, "save", save_that_dies)
    with pytest.raises(
        LitEmbedError, match=r"could not write the model .*No space left on device.*Nothing was replaced"
    ):
        to_sentence_transformers(tiny_encoder, tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_leftovers_of_a_killed_write_are_cleaned_up(tmp_path: Path) -> None:
    train, val = write_toy_data(tmp_path)
    leftover = tmp_path / "run" / "checkpoints" / ".last.ckpt.abc123.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a checkpoint from a run killed while saving")
    mark_run_folder(tmp_path / "run")  # the killed run's folder
    run(compose_train(tiny_run_overrides(train, val, tmp_path / "run", **{"trainer.max_steps": 1})))
    assert not leftover.exists()


class Payload:
    def __reduce__(self):
        return (print, ("this ran while loading a checkpoint",))


def test_checkpoints_load_with_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    with pytest.raises(LitEmbedError, match="never runs code from a checkpoint"):
        load_checkpoint(path)


def test_resume_without_a_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    train, val = write_toy_data(tmp_path)
    with pytest.raises(LitEmbedError, match=r"cannot resume: .*last\.ckpt does not exist"):
        run(compose_train(tiny_run_overrides(train, val, tmp_path / "fresh", resume="true")))
