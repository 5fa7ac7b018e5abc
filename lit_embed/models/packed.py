"""Packed sequences: a batch's texts concatenated into one row and attended to one text at a time, without padding.

A padded batch computes every text at the length of its group's longest; a packed one computes each text's own
tokens only. The transformer runs on ``[1, T]`` token ids (``T`` = the real tokens of all the texts), with position
ids restarting at 0 for each text (as a right-padded text has them), and its attention is replaced for that call by
:func:`varlen_attention`, which keeps every text to its own tokens. Pooling then reduces each text's tokens
(:func:`pool`), and the modules after the pooling (Dense, Normalize) run on the ``[n, D]`` result as usual.

Which attention does the work: FlashAttention's varlen kernel where ``flash-attn`` is installed and the inputs are
half precision on a GPU; else PyTorch's nested jagged tensors with ``scaled_dot_product_attention`` (bidirectional
encoders, CPU or GPU); else, for causal models without ``flash-attn``, one attention call per text.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Nested jagged tensors are what scaled_dot_product_attention takes for variable lengths; they are used as intended.
warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")

ATTENTION = "lit_embed_packed"
POOLING_MODES = ("cls", "mean", "max", "lasttoken")


@dataclass
class PackedTexts:
    """Texts as one row of tokens: what :func:`encode_packed` takes (a collated batch side holds one).

    Attributes:
        input_ids: ``[1, T]`` every text's token ids, one text after the other.
        position_ids: ``[1, T]`` each token's position within its text.
        cu_seqlens: ``[n + 1]`` int32 offsets of the texts in the row (``cu_seqlens[i]`` = where text ``i`` starts).
        lengths: the ``n`` texts' token counts, on the host (the per-text fallbacks need them without a device sync).
        extras: per-call values of the tokenizer (``prompt_length``, ``task``, ...), as the padded features carry them.
    """

    input_ids: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor
    lengths: list[int]
    extras: dict[str, Any]

    @classmethod
    def from_tokens(cls, values: Tensor, lengths: list[int], extras: dict[str, Any] | None = None) -> PackedTexts:
        """``values``: ``[T]`` the texts' token ids one after the other; ``lengths``: each text's count."""
        counts = torch.tensor(lengths, dtype=torch.int32)
        cu_seqlens = F.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))
        starts = torch.repeat_interleave(cu_seqlens[:-1].long(), counts.long())
        positions = torch.arange(len(values)) - starts
        return cls(values.long()[None], positions[None], cu_seqlens, list(lengths), dict(extras or {}))

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def max_length(self) -> int:
        return max(self.lengths, default=0)

    def joins(self, other: PackedTexts) -> bool:
        """Whether the two can be embedded in one call: the same per-call values but the task (the query and the
        document side of a batch, when their prompts have the same length or there are none)."""
        return {k: v for k, v in self.extras.items() if k != "task"} == {
            k: v for k, v in other.extras.items() if k != "task"
        }

    def join(self, other: PackedTexts) -> PackedTexts:
        """This row of texts followed by the other's (see :meth:`joins`)."""
        cu_seqlens = torch.cat([self.cu_seqlens, other.cu_seqlens[1:] + self.cu_seqlens[-1]])
        return PackedTexts(
            torch.cat([self.input_ids, other.input_ids], dim=1),
            torch.cat([self.position_ids, other.position_ids], dim=1),
            cu_seqlens,
            self.lengths + other.lengths,
            self.extras,
        )

    def split(self, size: int) -> list[PackedTexts]:
        """Runs of at most ``size`` texts, in order (the cached loss's mini-batches); no device sync."""
        runs, first = [], 0
        for start in range(0, len(self), size):
            lengths = self.lengths[start : start + size]
            last = first + sum(lengths)
            cu_seqlens = self.cu_seqlens[start : start + len(lengths) + 1] - self.cu_seqlens[start]
            tokens = slice(first, last)
            runs.append(
                PackedTexts(self.input_ids[:, tokens], self.position_ids[:, tokens], cu_seqlens, lengths, self.extras)
            )
            first = last
        return runs

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedTexts:
        move = {"device": device, "non_blocking": non_blocking}
        return PackedTexts(
            self.input_ids.to(**move),
            self.position_ids.to(**move),
            self.cu_seqlens.to(**move),
            self.lengths,
            self.extras,
        )

    def pin_memory(self) -> PackedTexts:
        return PackedTexts(
            self.input_ids.pin_memory(),
            self.position_ids.pin_memory(),
            self.cu_seqlens.pin_memory(),
            self.lengths,
            self.extras,
        )


def _flash_attn_varlen() -> Any:
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def varlen_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention within each packed text: ``[1, H, T, d]`` query/key/value -> ``[1, T, H, d]`` (transformers'
    attention-function interface; the packing comes in ``kwargs`` as ``packed``, a :class:`PackedTexts`)."""
    packed: PackedTexts = kwargs["packed"]
    causal = bool(getattr(module, "is_causal", False))
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, d]
    if k.size(1) != q.size(1):  # grouped-query attention: each key/value head serves several query heads
        k, v = (x.repeat_interleave(q.size(1) // x.size(1), dim=1) for x in (k, v))
    flash = _flash_attn_varlen() if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
    if flash is not None:
        cu, longest = packed.cu_seqlens, packed.max_length
        out = flash(q, k, v, cu, cu, longest, longest, dropout_p=dropout, softmax_scale=scaling, causal=causal)
    elif not causal:
        offsets = packed.cu_seqlens.long()

        def jagged(x: Tensor) -> Tensor:  # [T, H, d] -> [n, H, j, d]
            return torch.nested.nested_tensor_from_jagged(x, offsets, max_seqlen=packed.max_length).transpose(1, 2)

        attended = F.scaled_dot_product_attention(jagged(q), jagged(k), jagged(v), dropout_p=dropout, scale=scaling)
        out = attended.transpose(1, 2).values()  # [T, H, d]
    else:  # nested tensors have no causal attention: one call per text
        texts = zip(q.split(packed.lengths), k.split(packed.lengths), v.split(packed.lengths), strict=True)
        out = torch.cat(
            [
                F.scaled_dot_product_attention(
                    a.transpose(0, 1),
                    b.transpose(0, 1),
                    c.transpose(0, 1),
                    dropout_p=dropout,
                    scale=scaling,
                    is_causal=True,
                ).transpose(0, 1)
                for a, b, c in texts
            ]
        )
    return out[None], None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, varlen_attention)


@contextlib.contextmanager
def packed_attention(transformer: nn.Module) -> Iterator[None]:
    """The transformer's attention is :func:`varlen_attention` inside the block (its config is read at every call,
    so padded calls elsewhere, evaluation's, keep their own)."""
    config = transformer.config
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous


def pool(tokens: Tensor, packed: PackedTexts, mode: str, skip: int = 0) -> Tensor:
    """``[T, H]`` token embeddings -> ``[n, H]``: each text's ``mode`` pooling (``skip``: leading tokens of each text
    left out, a prompt that the pooling excludes)."""
    starts = packed.cu_seqlens[:-1].long()
    ends = packed.cu_seqlens[1:].long()
    if mode == "lasttoken":
        return tokens[ends - 1]
    if mode == "cls":
        return tokens[starts + skip]
    # output_size: the total is known on the host, so a GPU need not be asked for it (no sync).
    texts = torch.arange(len(packed), device=tokens.device)
    text = torch.repeat_interleave(texts, ends - starts, output_size=tokens.size(0))  # [T]
    keep = packed.position_ids[0] >= skip if skip else None
    if mode == "mean":  # summed in fp32 for half-precision tokens, as sentence-transformers sums
        total = torch.float32 if tokens.dtype in (torch.float16, torch.bfloat16) else tokens.dtype
        weights = keep.to(total) if keep is not None else torch.ones(tokens.size(0), dtype=total, device=tokens.device)
        sums = torch.zeros(len(packed), tokens.size(1), dtype=total, device=tokens.device)
        sums.index_add_(0, text, tokens.to(total) * weights[:, None])
        counted = torch.zeros(len(packed), dtype=total, device=tokens.device).index_add_(0, text, weights)
        return (sums / counted.clamp(min=1e-9)[:, None]).to(tokens.dtype)
    if mode == "max":
        values = tokens if keep is None else tokens.masked_fill(~keep[:, None], torch.finfo(tokens.dtype).min)
        out = torch.full((len(packed), tokens.size(1)), torch.finfo(tokens.dtype).min, dtype=tokens.dtype)
        return out.to(tokens.device).scatter_reduce(0, text[:, None].expand_as(values), values, "amax")
    raise ValueError(f"no packed pooling for mode {mode!r}")


_register()
