"""The few collective operations lit_embed needs beyond what Lightning's strategies do."""

from __future__ import annotations

import contextlib
import os
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the running process group, ``(0, 1)`` outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_launching_process() -> bool:
    """Whether this process is its job's global rank 0, known before the job's process group exists: False in the
    ranks > 0 of a distributed run, which share the launching process's output_dir and stores.

    Lightning's DDP launcher starts them as copies of this command with ``LOCAL_RANK`` / ``NODE_RANK`` set;
    torchrun and SLURM give every process ``RANK`` / ``SLURM_PROCID``.
    """
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        value = os.environ.get(name, "0").strip() or "0"
        if not value.isdigit() or int(value) != 0:
            return False
    return True


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward hands each rank the gradient of every rank's loss for its own rows.

    ``torch.distributed.nn.all_gather`` does the same, but its backward needs all-to-all, which gloo lacks;
    an all-reduce of the (small) embedding gradient works on every backend.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # [n, D], the same n on every rank
        ctx.rank = dist.get_rank()
        shards = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(shards, tensor.contiguous())
        return torch.stack(shards)  # [W, n, D]

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # [W, n, D]: this rank's loss, differentiated for every rank's rows
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum over the ranks' losses
        return grad[ctx.rank]


def all_gather_rows(tensor: Tensor) -> tuple[Tensor, list[int]]:
    """Concatenates every rank's ``[n_r, ...]`` rows (``n_r`` may differ), keeping the gradient flowing to each rank.

    Returns the ``[sum(n_r), ...]`` rows in rank order and the list of ``n_r``.
    """
    _, world = rank_and_world()
    if world == 1:
        return tensor, [tensor.size(0)]
    sizes_list = gather_sizes(tensor.size(0), tensor.device)
    padded = tensor.new_zeros((max(sizes_list), *tensor.shape[1:]))
    padded = torch.cat([tensor, padded[tensor.size(0) :]])  # a cat, not an in-place copy, keeps the graph
    gathered = _AllGatherWithGrad.apply(padded)  # [W, max n_r, ...]
    return torch.cat([rows[:n] for rows, n in zip(gathered, sizes_list, strict=True)]), sizes_list


def gather_sizes(size: int, device: torch.device) -> list[int]:
    """Every rank's ``size``, in rank order (``[size]`` outside a process group)."""
    _, world = rank_and_world()
    if world == 1:
        return [size]
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([size], dtype=torch.long, device=device))
    return [int(s.item()) for s in sizes]


def full_parameters(trainer: Any) -> AbstractContextManager:
    """Whole weights on every rank inside the block when the strategy shards them (FSDP), else a no-op.

    Evaluation and export call the encoder outside Lightning's forward pass, where FSDP leaves each rank only its
    shard. All ranks must enter the block together. Changes made inside are not written back to the shards.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = getattr(trainer.strategy, "model", None)
    if isinstance(model, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(model, writeback=False)
    return contextlib.nullcontext()
