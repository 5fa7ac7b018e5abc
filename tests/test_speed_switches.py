"""Every throughput switch leaves the loss and the gradients as they were (within bf16/fp32 tolerance)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO
from test_cached_loss import collated_batch, gradients

from lit_embed.data.datamodule import QAPairDataModule
from lit_embed.losses.mnrl import mnrl
from lit_embed.models.encoder import Encoder
from lit_embed.training.module import EmbeddingFinetuneModule


def loss_and_gradients(encoder: Encoder, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    encoder.zero_grad()
    loss = mnrl(batch.queries.embed(encoder), batch.documents.embed(encoder))
    loss.backward()
    return loss.detach().float(), gradients(encoder)


def test_bf16_autocast_keeps_the_loss_and_gradients_within_bf16_precision(tiny_encoder: Encoder) -> None:
    tiny_encoder.eval()
    batch = collated_batch(tiny_encoder, negatives=1)
    loss32, grads32 = loss_and_gradients(tiny_encoder, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, grads16 = loss_and_gradients(tiny_encoder, batch)
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
    flat32 = torch.cat([g.flatten() for g in grads32.values()])
    flat16 = torch.cat([grads16[name].flatten() for name in grads32])
    assert torch.nn.functional.cosine_similarity(flat16, flat32, dim=0) > 0.999
    largest = max(g.norm() for g in grads32.values())
    for name, grad in grads32.items():
        if grad.norm() > 1e-3 * largest:  # the key biases' true gradient is zero: only noise to compare there
            assert torch.nn.functional.cosine_similarity(grads16[name].flatten(), grad.flatten(), dim=0) > 0.98, name


def test_fused_adamw_takes_the_same_step(tiny_encoder: Encoder) -> None:
    module = EmbeddingFinetuneModule(tiny_encoder)
    batch = collated_batch(tiny_encoder, negatives=1)
    loss_and_gradients(tiny_encoder, batch)
    start = {name: p.detach().clone() for name, p in module.named_parameters()}
    after = {}
    for fused in (False, True):
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(start[name])
        optimizer = torch.optim.AdamW(module._param_groups(), lr=1e-3, weight_decay=0.01, fused=fused)
        for _ in range(3):
            optimizer.step()
        after[fused] = {name: p.detach().clone() for name, p in module.named_parameters()}
    assert any(not torch.equal(after[True][n], start[n]) for n in start)
    for name in start:
        torch.testing.assert_close(after[True][name], after[False][name], atol=1e-6, rtol=1e-5, msg=name)


def test_pinned_batches_are_the_same_batches(tiny_encoder: Encoder, tmp_path: Path) -> None:
    from helpers import write_toy_data

    train, _ = write_toy_data(tmp_path)
    batches = {}
    for pin in (False, True):
        data = QAPairDataModule(str(train), batch_size=8, pin_memory=pin)
        data.tokenize(tiny_encoder)
        loader = data.train_dataloader()
        assert loader.pin_memory == (pin and torch.cuda.is_available())
        batches[pin] = [batch.queries.groups[0]["input_ids"] for batch in loader]
    assert all(torch.equal(a, b) for a, b in zip(batches[False], batches[True], strict=True))


@pytest.mark.slow
def test_compiled_encoder_gives_the_same_loss_and_gradients(tiny_model_path: str) -> None:
    eager, compiled = Encoder(tiny_model_path), Encoder(tiny_model_path, compile=True)
    eager.eval(), compiled.eval()
    batch = collated_batch(eager, negatives=1)
    expected, got = loss_and_gradients(eager, batch), loss_and_gradients(compiled, batch)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=0)
    assert list(compiled.state_dict()) == list(eager.state_dict()), "compiling renamed the weights"
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("extra", [[], ["--cached", "4"]], ids=["plain", "cached"])
def test_throughput_benchmark_runs_and_prints_the_ratio(tmp_path: Path, extra: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--model", "tiny", "--batch-size", "16", "--steps", "4"]
        + ["--warmup", "1", "--rounds", "1", "--no-evaluate", "--json", str(tmp_path / "result.json"), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lit_embed / sentence-transformers:" in result.stdout
    assert "| sentence-transformers |" in result.stdout and "| lit_embed |" in result.stdout
    assert (tmp_path / "result.json").is_file()


def test_bf16_run_with_fused_adamw_clips_and_trains(tmp_path: Path) -> None:
    """Lightning's mixed-precision plugin refuses to clip for a fused optimizer; bf16 needs no refusal."""
    from helpers import compose_train, tiny_run_overrides, write_toy_data

    from lit_embed.train import run

    train, val = write_toy_data(tmp_path)
    settings = {"trainer.precision": "bf16-mixed", "optimizer.fused": "true", "trainer.gradient_clip_val": 1.0}
    metrics = run(compose_train(tiny_run_overrides(train, val, tmp_path / "run", **settings)))
    assert metrics["final"]["step"] >= 0 and (tmp_path / "run" / "model").is_dir()


def test_bf16_gradients_are_clipped_directly(tiny_encoder: Encoder) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import MixedPrecision

    module = EmbeddingFinetuneModule(tiny_encoder)
    module._trainer = SimpleNamespace(precision_plugin=MixedPrecision("bf16-mixed", "cpu"))
    loss_and_gradients(tiny_encoder, collated_batch(tiny_encoder, negatives=1))
    optimizer = torch.optim.AdamW(module._param_groups(), fused=True)
    module.configure_gradient_clipping(optimizer, gradient_clip_val=1e-3, gradient_clip_algorithm="norm")
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters() if p.grad is not None]))
    assert norm == pytest.approx(1e-3, rel=1e-3)
