"""Warmup over 10% of the steps to the peak learning rate, then linear decay to zero."""

from __future__ import annotations

import pytest
import torch

from lit_embed.training.optim import LinearWarmupDecay


def lrs(total: int, warmup_ratio: float = 0.1, peak: float = 2e-5) -> list[float]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = LinearWarmupDecay(optimizer, total_steps=total, warmup_ratio=warmup_ratio)
    values = []
    for _ in range(total + 1):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def test_zero_at_start_peak_after_warmup_zero_at_end() -> None:
    values = lrs(100)
    assert values[0] == 0.0
    assert values[5] == pytest.approx(1e-5)
    assert values[10] == pytest.approx(2e-5)
    assert max(values) == pytest.approx(2e-5)
    assert values[55] == pytest.approx(1e-5)
    assert values[100] == 0.0
    assert all(a <= b for a, b in zip(values[:10], values[1:11], strict=True))
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))


def test_no_warmup_and_tiny_runs() -> None:
    assert lrs(10, warmup_ratio=0.0)[0] == pytest.approx(2e-5)
    assert lrs(5)[0] == pytest.approx(2e-5)  # int(5 * 0.1) = 0 warmup steps, as LlamaIndex computes it
