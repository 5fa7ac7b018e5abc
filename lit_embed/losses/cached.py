"""GradCache: any embedding loss on batches far larger than fit in memory, with the gradients of the whole batch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lit_embed.batch import Features, PackedTexts, PairBatch, TokenGroups
from lit_embed.errors import check, is_int
from lit_embed.losses.base import EmbeddingLoss
from lit_embed.losses.mnrl import MultipleNegativesRankingLoss


def mini_batches(side: TokenGroups, size: int, tokens: int | None = None) -> list[Features | PackedTexts]:
    """Splits one side of a batch into mini-batches of at most ``size`` rows, or of at most ``tokens`` computed tokens.

    Each length group is cut into runs, each trimmed to its own longest row (a packed side into runs of texts).
    Rows keep the groups' order, so the mini-batches' outputs concatenated are the groups' outputs (``order`` still
    applies). With ``tokens``, runs are cut by what the encoder computes: the texts' tokens when packed, rows x the
    run's longest row when padded (those lengths are read from the device: one sync per step).
    """
    chunks: list[Features | PackedTexts] = []
    for features in side.groups:
        if isinstance(features, PackedTexts):
            chunks += features.split(run_sizes(features.lengths, size, tokens, padded=False))
            continue
        mask = features["attention_mask"]  # [n, L]
        lengths = mask.sum(dim=1).tolist() if tokens is not None else [mask.size(1)] * mask.size(0)
        start = 0
        for count in run_sizes(lengths, size, tokens, padded=True):
            rows = slice(start, start + count)
            start += count
            # Drop the columns that are padding in every row, on whichever side the group was padded.
            used = mask[rows].any(dim=0)  # [L]
            chunks.append(
                {
                    key: value[rows][:, used] if isinstance(value, Tensor) and value.shape == mask.shape else value
                    for key, value in features.items()
                }
            )
    return chunks


def run_sizes(lengths: Sequence[int], size: int, tokens: int | None, padded: bool) -> list[int]:
    """How many of the texts (of these ``lengths``, in order) each mini-batch takes: ``size`` at a time, or with a
    token budget as many as keep its computed tokens (their sum; padded, texts x the longest) within ``tokens``. A
    text longer than the budget is a mini-batch of its own."""
    if tokens is None:
        return [min(size, len(lengths) - start) for start in range(0, len(lengths), size)]
    counts: list[int] = []
    count = total = longest = 0
    for length in lengths:
        cost = (count + 1) * max(longest, length) if padded else total + length
        if count and cost > tokens:
            counts.append(count)
            count = total = longest = 0
        count, total, longest = count + 1, total + length, max(longest, length)
    return counts + [count] if count else counts


@contextmanager
def replayed_rng(state: tuple[Tensor, Tensor | None]) -> Iterator[None]:
    """Runs the block from a saved RNG state (so dropout draws the same masks) and then puts the RNG back."""
    cpu_state, cuda_state = state
    devices = [torch.cuda.current_device()] if cuda_state is not None else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state)
        yield


def rng_state() -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None


class _WithGradients(torch.autograd.Function):
    """The loss value, whose backward hands the parameters their precomputed gradients (scaled as the loss is)."""

    @staticmethod
    def forward(ctx, loss: Tensor, gradients: list[Tensor], *params: Tensor) -> Tensor:
        ctx.gradients = gradients
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        return (None, None, *(g * grad.to(g.dtype) for g in ctx.gradients))


class CachedLoss(EmbeddingLoss):
    """Trains on huge batches in the memory of one mini-batch, with exactly the big batch's gradients (GradCache).

    1. Every text of the batch is embedded in mini-batches without a graph (the RNG state before each is kept).
    2. The loss and its gradient for each embedding are computed on the whole batch at once.
    3. Each mini-batch is embedded again, now with its graph and the same dropout masks (the RNG is replayed),
       and back-propagated with its embeddings' gradients from step 2; its graph is freed before the next.

    The returned loss carries the summed parameter gradients into Lightning's backward, so gradient clipping,
    accumulation and DDP's gradient averaging work as for any loss. Costs one extra forward pass per step.

    Args:
        loss: the embedding loss, ``loss(queries [B, D], documents [B + N, D])`` (default: MNRL, scale 20). With
            ``gather_across_devices`` it sees the global batch under DDP.
        mini_batch_size: texts encoded at once; bounds the activation memory.
        mini_batch_tokens: tokens encoded at once, instead of ``mini_batch_size`` texts (as sentence-transformers'
            ``mini_batch_num_tokens``): the memory is then bounded by tokens, however uneven the texts' lengths.
            Counted as computed: each text's tokens when packed, rows x the longest row in length groups. A text
            longer than this is encoded on its own. None: ``mini_batch_size`` texts.
    """

    def __init__(
        self, loss: EmbeddingLoss | None = None, mini_batch_size: int = 32, mini_batch_tokens: int | None = None
    ) -> None:
        super().__init__()
        check(
            is_int(mini_batch_size) and mini_batch_size >= 1,
            "mini_batch_size",
            mini_batch_size,
            "a whole number of texts encoded at once, >= 1",
        )
        check(
            mini_batch_tokens is None or (is_int(mini_batch_tokens) and mini_batch_tokens >= 1),
            "mini_batch_tokens",
            mini_batch_tokens,
            "a whole number of tokens encoded at once, >= 1, or null for mini_batch_size texts",
        )
        self.loss = loss if loss is not None else MultipleNegativesRankingLoss()
        self.mini_batch_size = mini_batch_size
        self.mini_batch_tokens = mini_batch_tokens

    def forward(self, queries: Tensor, documents: Tensor) -> Tensor:
        return self.loss(queries, documents)

    def batch_loss(self, encoder: nn.Module, batch: PairBatch) -> Tensor:
        """The loss of a batch, ready for ``backward()``, which hands the encoder the whole batch's gradients."""
        sides = [batch.queries, batch.documents]
        chunks = [mini_batches(side, self.mini_batch_size, self.mini_batch_tokens) for side in sides]
        states: list[list[tuple[Tensor, Tensor | None]]] = [[], []]
        grouped = []
        with torch.no_grad():
            for side_chunks, side_states in zip(chunks, states, strict=True):
                outputs = []
                for chunk in side_chunks:
                    side_states.append(rng_state())
                    outputs.append(encoder(chunk))
                grouped.append(torch.cat(outputs))  # [N, D] in group order
        # Leaves in the batch's row order; their gradients are what each mini-batch back-propagates.
        queries, documents = (
            rows[side.order].detach().requires_grad_() for rows, side in zip(grouped, sides, strict=True)
        )
        with torch.enable_grad():
            loss = self.loss.embeddings_loss(encoder, batch, queries, documents)
        # A non-finite loss is not checked here (a host sync): its gradients are non-finite too, and the module
        # skips such a step (on the device with a fused optimizer).
        embedding_grads = torch.autograd.grad(loss, [queries, documents])
        params = [p for p in encoder.parameters() if p.requires_grad]
        totals: list[Tensor | None] = [None] * len(params)
        for side, side_chunks, side_states, grad in zip(sides, chunks, states, embedding_grads, strict=True):
            grouped_grad = torch.empty_like(grad)
            grouped_grad[side.order] = grad  # back to group order, the order the mini-batches come in
            start = 0
            for chunk, state in zip(side_chunks, side_states, strict=True):
                with torch.enable_grad(), replayed_rng(state):
                    embeddings = encoder(chunk)  # [n, D]
                chunk_grad = grouped_grad[start : start + embeddings.size(0)].to(embeddings.dtype)
                start += embeddings.size(0)
                grads = torch.autograd.grad(embeddings, params, grad_outputs=chunk_grad, allow_unused=True)
                totals = [t if g is None else g if t is None else t.add_(g) for t, g in zip(totals, grads, strict=True)]
        # Parameters the encoder never used (a BERT pooler) get no gradient at all, as with the plain loss.
        used = [(param, total) for param, total in zip(params, totals, strict=True) if total is not None]
        return _WithGradients.apply(loss.detach(), [total for _, total in used], *(param for param, _ in used))

    def scores_several_positives(self) -> bool:
        return self.loss.scores_several_positives()

    def extra_repr(self) -> str:
        if self.mini_batch_tokens is not None:
            return f"mini_batch_tokens={self.mini_batch_tokens}"
        return f"mini_batch_size={self.mini_batch_size}"
