"""Packed sequences: a batch's texts concatenated into one row and attended to one text at a time, without padding.

A padded batch computes every text at the length of its group's longest; a packed one computes each text's own
tokens only. The transformer runs on ``[1, T]`` token ids (``T`` = the real tokens of all the texts), with position
ids restarting at 0 for each text (as a right-padded text has them), and its attention is replaced for that call by
:func:`varlen_attention`, which keeps every text to its own tokens. Pooling then reduces each text's tokens
(:func:`pool`), and the modules after the pooling (Dense, Normalize) run on the ``[n, D]`` result as usual.

Which attention does the work: FlashAttention's varlen kernel where ``flash-attn`` is installed and the inputs are
half precision on a GPU; else, for bidirectional encoders on a GPU, PyTorch's nested jagged tensors with
``scaled_dot_product_attention``; else (the CPU, where it is the fastest, and causal models without ``flash-attn``)
one attention call per text. With ``model.compile`` the transformer is compiled around this attention, which
stays a call of its own, on rows padded to a multiple of :data:`PACKED_BUCKET` tokens.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_embed.batch import PackedTexts
from lit_embed.internals import attention_implementation, set_attention_implementation

ATTENTION = "lit_embed_packed"  # the installed attention is named "lit_embed_packed+<the model's own>"
POOLING_MODES = ("cls", "mean", "max", "lasttoken")
# A compiled encoder's packed rows are padded to a multiple of this many tokens: few distinct shapes, aligned tiles,
# and at most 63 padding tokens a row (0.2% of a 256-pair batch of 130-token texts).
PACKED_BUCKET = 64


@functools.cache
def _flash_attn_varlen() -> Any:
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def attention_kind(query: Tensor, causal: bool) -> str:
    """Which attention packed texts get (see the module's docstring): "flash", "nested" or "per_text"."""
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and _flash_attn_varlen() is not None:
        return "flash"
    return "nested" if query.is_cuda and not causal else "per_text"


# Outside a compiled graph: the per-text fallback loops over host lengths (a graph would be specialised on them) and
# the fused kernels gain nothing from tracing. The layers around it compile.
@torch.compiler.disable
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
    kind = attention_kind(q, causal)
    if kind == "flash":
        cu, longest = packed.cu_seqlens, packed.max_length
        flash = _flash_attn_varlen()
        out = flash(q, k, v, cu, cu, longest, longest, dropout_p=dropout, softmax_scale=scaling, causal=causal)
    elif kind == "nested":
        offsets = packed.cu_seqlens.long()

        def jagged(x: Tensor) -> Tensor:  # [T, H, d] -> [n, H, j, d]
            return torch.nested.nested_tensor_from_jagged(x, offsets, max_seqlen=packed.max_length).transpose(1, 2)

        with warnings.catch_warnings():  # nested jagged tensors are used as intended: not a "prototype" warning
            warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")
            attended = F.scaled_dot_product_attention(jagged(q), jagged(k), jagged(v), dropout_p=dropout, scale=scaling)
        out = attended.transpose(1, 2).values()  # [T, H, d]
    else:  # nested tensors have no causal attention, and on the CPU their attention is slower: one call per text
        texts = zip(q.split(packed.lengths), k.split(packed.lengths), v.split(packed.lengths), strict=True)
        out = torch.cat(
            [
                F.scaled_dot_product_attention(
                    a.transpose(0, 1),
                    b.transpose(0, 1),
                    c.transpose(0, 1),
                    dropout_p=dropout,
                    scale=scaling,
                    is_causal=causal,
                ).transpose(0, 1)
                for a, b, c in texts
            ]
        )
    return out[None], None


def install_packed_attention(transformer: nn.Module) -> str | None:
    """Gives the transformer an attention that runs :func:`varlen_attention` for a call with ``packed=`` and its own
    attention for any other; returns why it cannot (None: installed, or already there).

    Registered with transformers' attention and mask registries under one name per own attention, so every layer
    finds it through the config, in the forward pass and when recomputed; a padded call gets the mask its own
    attention would. A packed call passes :func:`attend_all` as its mask, which transformers takes as made already.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    own = attention_implementation(transformer.config)
    if own is not None and own.startswith(ATTENTION):
        return None
    if own not in ALL_ATTENTION_FUNCTIONS or own not in ALL_MASK_ATTENTION_FUNCTIONS:
        # "eager" is each architecture's own function, which a shared wrapper cannot call.
        return (
            f"its attention ({own}) is not one of transformers' shared ones "
            "(model.model_kwargs.attn_implementation=sdpa is)"
        )
    name = f"{ATTENTION}+{own}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        padded_attention = ALL_ATTENTION_FUNCTIONS[own]

        def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Any:
            if "packed" in kwargs:
                return varlen_attention(module, query, key, value, *args, **kwargs)
            return padded_attention(module, query, key, value, *args, **kwargs)

        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[own])
    set_attention_implementation(transformer.config, name)
    return None


def attend_all(device: torch.device) -> Tensor:
    """The attention mask of a packed call: ``[1, 1, 1, 1]``, every position may attend (``varlen_attention`` keeps
    each text to itself). Already 4-D, so transformers builds no mask of its own: no ``[T, T]`` mask for a causal
    model, and no host read to look for packed position ids."""
    return torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)


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
