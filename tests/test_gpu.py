"""GPU checks (``-m gpu``, run by benchmarks/gpu_check.sh): a bf16 training step, a compiled packed one that skips a
NaN step on the device, packed against padded on CUDA, the cached loss's memory bound, and FSDP (clipping, a stopped
run resumed by another strategy). Skipped without a CUDA device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, compose_train, tiny_run_overrides, write_toy_data
from safetensors.torch import load_file
from test_packed import TEXTS, packed_of, write_pairs

from lit_embed.data.datamodule import QAPairDataModule
from lit_embed.losses.mnrl import MultipleNegativesRankingLoss
from lit_embed.models.encoder import Encoder
from lit_embed.train import run
from lit_embed.training.checkpoint_io import load_checkpoint
from lit_embed.training.steps import GradCache, plain_step

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_a_bf16_training_step_runs_and_exports(tmp_path: Path) -> None:
    train, val = write_toy_data(tmp_path)
    overrides = {"trainer": "gpu", "trainer.precision": "bf16-mixed", "data.packing": "true", "trainer.max_steps": 3}
    metrics = run(compose_train(tiny_run_overrides(train, val, tmp_path / "run", **overrides)))
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics["final"].values())


def test_a_compiled_packed_bf16_run_with_a_nan_step_skips_it_on_the_device(tmp_path: Path, monkeypatch) -> None:
    from test_bad_inputs import nan_on_call

    train, val = write_toy_data(tmp_path)
    nan_on_call(monkeypatch, call=1)
    overrides = {
        "trainer": "gpu",
        "trainer.precision": "bf16-mixed",
        "data.packing": "true",
        "method.compile": "true",
        "method.skip_nonfinite": "true",
        "trainer.max_steps": 4,
        "load_best_model_at_end": "false",
    }
    out = tmp_path / "run"
    metrics = run(compose_train(tiny_run_overrides(train, val, out, **overrides)))
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics["final"].values())
    assert load_checkpoint(out / "checkpoints" / "last.ckpt")["skipped_batches"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_embeddings_equal_padded_ones_on_cuda(model_paths, dtype: torch.dtype) -> None:
    encoder = Encoder(model_paths["encoder"], query_prompt="query: ").cuda()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        padded = encoder.embed_features(
            {k: v.cuda() if torch.is_tensor(v) else v for k, v in encoder.tokenize(TEXTS, "query").items()}
        )
        packed = encoder(packed_of(encoder, TEXTS, "query").to("cuda"))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 kernels sum in another order
    torch.testing.assert_close(packed.float(), padded.float(), atol=tolerance, rtol=tolerance)


def test_packed_loss_and_gradients_equal_padded_ones_on_cuda(tmp_path: Path, model_paths) -> None:
    encoder = Encoder(model_paths["encoder"]).cuda()
    path = write_pairs(tmp_path / "train.jsonl")
    results = []
    for packing in (False, True):
        data = QAPairDataModule(train_path=str(path), batch_size=8, packing=packing)
        data.tokenize(encoder)
        batch = data.collator(next(iter(data.batch_sampler())))
        encoder.zero_grad()
        loss = plain_step(encoder, _to_cuda(batch), MultipleNegativesRankingLoss())
        loss.backward()
        results.append(
            (loss.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None})
        )
    (padded_loss, padded), (packed_loss, packed) = results
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    for name, grad in padded.items():
        torch.testing.assert_close(packed[name], grad, atol=1e-4, rtol=1e-3, msg=name)


def test_the_cached_loss_holds_memory_to_its_mini_batches(tmp_path: Path, model_paths) -> None:
    """Peak memory of a 64-pair step with the cached loss in mini-batches of 8 stays near a plain 8-pair step's."""
    encoder = Encoder(model_paths["encoder"]).cuda()
    path = write_pairs(tmp_path / "train.jsonl", n=128)
    peaks = {}
    for name, size, step in (("plain-8", 8, plain_step), ("cached-64", 64, GradCache(mini_batch_size=8))):
        data = QAPairDataModule(train_path=str(path), batch_size=size)
        data.tokenize(encoder)
        batch = _to_cuda(data.collator(next(iter(data.batch_sampler()))))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(encoder, batch, MultipleNegativesRankingLoss()).backward()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - before
        encoder.zero_grad(set_to_none=True)
    assert peaks["cached-64"] < 2 * peaks["plain-8"], peaks


def test_fsdp_clips_trains_and_a_stopped_run_resumes_on_a_plain_gpu(tmp_path: Path) -> None:
    """trainer=fsdp with the default gradient clipping (FSDP's own norm), SIGTERM after a step (whole weights and
    optimizer state saved), and that checkpoint resumed by a single-GPU run without FSDP (another number of shards):
    the weights of an uninterrupted FSDP run. Each run in a process of its own (FSDP's process group)."""
    train, val = write_toy_data(tmp_path)
    settings = {"trainer.precision": "32-true", "load_best_model_at_end": "false", "resume": "auto"}

    def train_py(out: Path, trainer: list[str], *extra: str, ok: bool = True) -> None:
        command = [sys.executable, "train.py", *tiny_run_overrides(train, val, out, **settings), *trainer, *extra]
        env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}  # helpers.SignalAt
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert (proc.returncode == 0) == ok, (proc.stdout + proc.stderr)[-4000:]

    fsdp = ["trainer=fsdp", "trainer.devices=1"]
    train_py(tmp_path / "straight", fsdp)
    stopped = tmp_path / "stopped"
    train_py(stopped, fsdp, "+callbacks.preempt._target_=helpers.SignalAt", "+callbacks.preempt.step=2", ok=False)
    assert load_checkpoint(stopped / "checkpoints" / "last.ckpt")["global_step"] == 3
    train_py(stopped, ["trainer=gpu", "trainer.devices=1"], "resume_changed=true")  # the strategy is the change
    expected = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(stopped / "model" / "model.safetensors")
    for key, weights in expected.items():
        torch.testing.assert_close(resumed[key], weights, atol=1e-5, rtol=1e-4, msg=key)


def _to_cuda(batch):
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(batch, torch.device("cuda"))
