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


def stepped(total: int, steps: int, peak: float = 2e-5) -> tuple[torch.optim.Optimizer, LinearWarmupDecay]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = LinearWarmupDecay(optimizer, total_steps=total)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler


def test_a_resumed_schedule_keeps_its_step_count_on_the_new_length() -> None:
    finished, schedule = stepped(total=10, steps=10)
    assert finished.param_groups[0]["lr"] == 0.0  # the end of the decay
    longer, resumed = stepped(total=20, steps=0)
    longer.load_state_dict(finished.state_dict())  # Lightning restores the optimizer first, with the old rate
    resumed.load_state_dict(schedule.state_dict())
    reference, _ = stepped(total=20, steps=10)
    assert (resumed.total_steps, resumed.warmup_steps, resumed.last_epoch) == (20, 2, 10)
    assert longer.param_groups[0]["lr"] == reference.param_groups[0]["lr"] == pytest.approx(2e-5 * 10 / 18)
    assert resumed.get_last_lr() == [reference.param_groups[0]["lr"]]


def test_a_resumed_schedule_of_the_same_length_goes_on_unchanged() -> None:
    interrupted, schedule = stepped(total=10, steps=4)
    optimizer, resumed = stepped(total=10, steps=0)
    optimizer.load_state_dict(interrupted.state_dict())
    resumed.load_state_dict(schedule.state_dict())
    assert optimizer.param_groups[0]["lr"] == interrupted.param_groups[0]["lr"]
    for _ in range(6):
        optimizer.step()
        resumed.step()
        interrupted.step()
        schedule.step()
        assert optimizer.param_groups[0]["lr"] == interrupted.param_groups[0]["lr"]
