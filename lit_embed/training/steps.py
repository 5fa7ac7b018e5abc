"""How a training step turns a batch into a loss: the batch embedded in one pass, or by GradCache.

A step strategy is chosen beside the loss (as Tevatron chooses its trainer): the loss is a function of an embedded
batch (:class:`~lit_embed.batch.Embedded`) and knows nothing of how the embeddings were made, so every loss, and
Matryoshka around any of them, trains with either.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lit_embed.batch import PackedTexts, PairBatch
from lit_embed.errors import check, is_int
from lit_embed.losses.base import EmbeddingLoss
from lit_embed.losses.mnrl import MultipleNegativesRankingLoss


def plain_step(encoder: nn.Module, batch: PairBatch, loss: EmbeddingLoss) -> Tensor:
    """The loss of the batch embedded (or, by a reranker, scored) in one pass, with its graph: Lightning's backward
    does the rest."""
    return loss(batch.outputs(encoder))


def mini_batches(side: PackedTexts, size: int, tokens: int | None, packs: bool) -> list[PackedTexts]:
    """One side of a batch in runs of at most ``size`` texts, or of at most ``tokens`` computed tokens: each text's
    tokens where the encoder ``packs`` them, texts x the run's longest where it pads."""
    return side.split(run_sizes(side.lengths, size, tokens, padded=not packs))


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


class GradCache(nn.Module):
    """Embeds huge batches in the memory of one mini-batch, with exactly the big batch's gradients (GradCache).

    1. Every text of the batch is embedded in mini-batches without a graph (the RNG state before each is kept).
    2. The loss and its gradient for each embedding are computed on the whole batch at once.
    3. Each mini-batch is embedded again, now with its graph and the same dropout masks (the RNG is replayed),
       and back-propagated with its embeddings' gradients from step 2; its graph is freed before the next.

    The returned loss carries the summed parameter gradients into Lightning's backward, so gradient clipping,
    accumulation, fp16's loss scaling and DDP's gradient averaging work as for any loss. Costs one extra forward
    pass per step.

    Configured in the loss's place around the loss it runs (``loss=cached_mnrl``: ``GradCache(loss=MNRL)``); the
    module takes it apart into this step and that loss (:func:`split_step`), wherever it sits in the loss's config.

    Args:
        loss: the loss it runs (default: MNRL, scale 20). With ``gather_across_devices`` it sees the global batch
            under DDP.
        mini_batch_size: texts encoded at once; bounds the activation memory.
        mini_batch_tokens: tokens encoded at once, instead of ``mini_batch_size`` texts (as sentence-transformers'
            ``mini_batch_num_tokens``): the memory is then bounded by tokens, however uneven the texts' lengths.
            Counted as computed: each text's tokens when packed, texts x the longest in a padded mini-batch. A text
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
        # Not a submodule: the module trains it as the task's loss; this step only runs it.
        self.__dict__["loss"] = loss if loss is not None else MultipleNegativesRankingLoss()
        self.mini_batch_size = mini_batch_size
        self.mini_batch_tokens = mini_batch_tokens

    def forward(self, encoder: nn.Module, batch: PairBatch, loss: EmbeddingLoss, loss_scale: float = 1.0) -> Tensor:
        """The loss of a batch, ready for ``backward()``, which hands the encoder the whole batch's gradients.

        ``loss_scale``: fp16's current loss scale; the mini-batches' backward passes run scaled, as Lightning's
        backward of an unscaled loss would, so their half-precision gradients do not underflow.
        """
        sides = [batch.queries, batch.documents]
        chunks = [
            mini_batches(side, self.mini_batch_size, self.mini_batch_tokens, encoder.packs(side)) for side in sides
        ]
        states: list[list[tuple[Tensor, Tensor | None]]] = [[], []]
        embedded = []
        with torch.no_grad():
            for side_chunks, side_states in zip(chunks, states, strict=True):
                outputs = []
                for chunk in side_chunks:
                    side_states.append(rng_state())
                    outputs.append(encoder(chunk))
                embedded.append(torch.cat(outputs).detach().requires_grad_())  # [n, D]: leaves in the batch's order
        queries, documents = embedded
        with torch.enable_grad():
            value = loss(batch.embedded(queries, documents))
        # A non-finite loss is not checked here (a host sync): its gradients are non-finite too, and the module
        # skips such a step (on the device with a fused optimizer).
        embedding_grads = torch.autograd.grad(value * loss_scale, [queries, documents])
        params = [p for p in encoder.parameters() if p.requires_grad]
        totals: list[Tensor | None] = [None] * len(params)
        for side_chunks, side_states, grad in zip(chunks, states, embedding_grads, strict=True):
            start = 0
            for chunk, state in zip(side_chunks, side_states, strict=True):
                with torch.enable_grad(), replayed_rng(state):
                    embeddings = encoder(chunk)  # [n, D]
                chunk_grad = grad[start : start + embeddings.size(0)].to(embeddings.dtype)
                start += embeddings.size(0)
                grads = torch.autograd.grad(embeddings, params, grad_outputs=chunk_grad, allow_unused=True)
                totals = [t if g is None else g if t is None else t.add_(g) for t, g in zip(totals, grads, strict=True)]
        # Parameters the encoder never used (a BERT pooler) get no gradient at all, as with the plain loss.
        used = [(param, total / loss_scale) for param, total in zip(params, totals, strict=True) if total is not None]
        return _WithGradients.apply(value.detach(), [total for _, total in used], *(param for param, _ in used))

    def extra_repr(self) -> str:
        if self.mini_batch_tokens is not None:
            return f"mini_batch_tokens={self.mini_batch_tokens}"
        return f"mini_batch_size={self.mini_batch_size}"


def split_step(loss: nn.Module) -> tuple[GradCache | None, nn.Module]:
    """The step a loss config asks for, and the loss without it: a :class:`GradCache` at the top of the config
    (``loss=cached_mnrl``) or inside another loss (``loss=matryoshka loss.loss=...cached``) embeds the batch for the
    whole loss; None: the plain step."""
    if isinstance(loss, GradCache):
        return loss, loss.loss
    for parent in loss.modules():
        for name, child in parent.named_children():
            if isinstance(child, GradCache):
                setattr(parent, name, child.loss)
                return child, loss
    return None, loss
