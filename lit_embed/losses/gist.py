"""GISTEmbed: in-batch negatives chosen by a guide model, which drops those it scores as likely false negatives."""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_embed.batch import PairBatch, TokenGroups
from lit_embed.errors import LitEmbedError, check, is_bool, is_number
from lit_embed.losses.base import EmbeddingLoss
from lit_embed.models.encoder import Encoder, TextKind

MarginStrategy = Literal["absolute", "relative"]


def gist(
    queries: Tensor,
    documents: Tensor,
    guide_queries: Tensor,
    guide_documents: Tensor,
    temperature: float = 0.01,
    margin_strategy: MarginStrategy = "absolute",
    margin: float = 0.0,
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy of each query against the candidates its guide does not judge to be false negatives.

    The candidates of query ``i`` are every positive (query-document), every other query (query-query, with
    ``contrast_anchors``), every other positive (positive-positive, with ``contrast_positives``) and every hard
    negative, as in sentence-transformers' ``GISTEmbedLoss``. A candidate is dropped (its score set to -inf) when
    the guide scores it above the guide's score of query ``i``'s own positive less the margin: ``margin`` with
    the "absolute" strategy, ``|positive score| * margin`` with "relative". Query ``i``'s positive is never dropped.

    Args:
        queries: ``[B, D]`` the student's query embeddings.
        documents: ``[B + N, D]`` the student's documents: row ``i < B`` is query ``i``'s positive, the ``N`` rows
            after them hard negatives (candidates for every query).
        guide_queries: ``[B, D']`` the guide's embeddings of the same queries.
        guide_documents: ``[B + N, D']`` the guide's embeddings of the same documents.
        temperature: divides the cosine similarities (0.01 = MNRL's scale 100).
        margin_strategy: "absolute" or "relative" (see above).
        margin: how far below the positive's guide score a candidate must stay to be kept.
        contrast_anchors: include the query-query candidates.
        contrast_positives: include the positive-positive candidates.

    Returns:
        The mean loss over the ``B`` queries, and how many candidates the guide dropped (an integer tensor;
        a query itself and its own positive, never candidates of their own row, are not counted).
    """
    size = queries.size(0)
    if documents.size(0) < size or guide_documents.size(0) != documents.size(0):
        raise ValueError(
            f"need one positive per query and the guide's view of every document: {size} queries, "
            f"{documents.size(0)} documents, {guide_documents.size(0)} guide documents"
        )
    queries, documents = F.normalize(queries, dim=-1), F.normalize(documents, dim=-1)
    guide_queries, guide_documents = F.normalize(guide_queries, dim=-1), F.normalize(guide_documents, dim=-1)
    positives, guide_positives = documents[:size], guide_documents[:size]  # [B, D], [B, D']
    guide_positive = (guide_queries * guide_positives).sum(dim=-1, keepdim=True)  # [B, 1]
    if margin_strategy == "absolute":
        limit = guide_positive - margin  # [B, 1]
    else:
        limit = guide_positive - guide_positive.abs() * margin
    diagonal = torch.eye(size, dtype=torch.bool, device=queries.device)  # [B, B]
    # (student's scores, guide's scores, what the diagonal of the block is: the target, the text itself, or neither)
    blocks = [(queries @ positives.T, guide_queries @ guide_positives.T, "target")]  # [B, B]
    if contrast_anchors:
        blocks.append((queries @ queries.T, guide_queries @ guide_queries.T, "self"))  # [B, B]
    if contrast_positives:
        blocks.append((positives @ positives.T, guide_positives @ guide_positives.T, "self"))  # [B, B]
    if documents.size(0) > size:
        blocks.append((queries @ documents[size:].T, guide_queries @ guide_documents[size:].T, None))  # [B, N]
    scores, masked = [], torch.zeros((), dtype=torch.long, device=queries.device)
    for student, guided, on_diagonal in blocks:
        dropped = guided > limit  # [B, candidates]
        if on_diagonal is not None:
            dropped &= ~diagonal  # the target is never dropped; a text itself is no candidate to count
        masked = masked + dropped.sum()
        if on_diagonal == "self":
            dropped |= diagonal
        scores.append(student.masked_fill(dropped, -torch.inf))
    logits = torch.cat(scores, dim=1) / temperature  # [B, B (+ B) (+ B) + N]
    # bf16/fp16 logits lose too much precision in the softmax; compute it in at least fp32.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    labels = torch.arange(size, device=queries.device)  # query i's positive is column i
    return F.cross_entropy(logits, labels), masked


class GISTLoss(EmbeddingLoss):
    """GISTEmbed (sentence-transformers' ``GISTEmbedLoss``): MNRL whose in-batch negatives a guide model vets.

    The guide embeds the same texts as the student; candidates it scores above a query's own positive (less the
    margin) are taken for unlabelled positives and left out of that query's softmax. The guide is frozen, kept
    out of the LightningModule's weights (never trained, never in a checkpoint) and each text's guide embedding
    is computed once per run, not every epoch.

    Args:
        guide: a sentence-transformers model path or hub id; it embeds each text with its own tokenizer and
            prompts. None: the student's base model as loaded at step 0 (no other model, no download).
        temperature: divides the cosine similarities (sentence-transformers' default 0.01 = scale 100).
        margin_strategy: "absolute" (drop candidates above positive - margin) or "relative" (above
            positive - |positive| * margin).
        margin: see ``margin_strategy``; 0 drops only candidates the guide ranks above the positive.
        contrast_anchors: other queries are candidates too.
        contrast_positives: other queries' positives are candidates of a query's positive's side too.
        guide_batch_size: texts the guide embeds at once when it meets new ones.
    """

    def __init__(
        self,
        guide: str | os.PathLike | None = None,
        temperature: float = 0.01,
        margin_strategy: MarginStrategy = "absolute",
        margin: float = 0.0,
        contrast_anchors: bool = True,
        contrast_positives: bool = True,
        guide_batch_size: int = 64,
    ) -> None:
        super().__init__()
        check(
            guide is None or isinstance(guide, str | os.PathLike) and str(guide) != "",
            "guide",
            guide,
            "a sentence-transformers model path or hub id, or null for a frozen copy of the base model",
        )
        check(
            is_number(temperature) and temperature > 0,
            "temperature",
            temperature,
            "a positive number that divides the cosine similarities (0.01 = scale 100)",
        )
        check(
            margin_strategy in ("absolute", "relative"),
            "margin_strategy",
            margin_strategy,
            '"absolute" (drop candidates above positive - margin) or "relative" (above positive - |positive| * margin)',
        )
        check(
            is_number(margin) and margin >= 0,
            "margin",
            margin,
            "a number >= 0: how far below the positive's guide score a kept candidate must be",
        )
        for key, value in (("contrast_anchors", contrast_anchors), ("contrast_positives", contrast_positives)):
            check(is_bool(value), key, value, "true or false")
        check(
            isinstance(guide_batch_size, int) and not isinstance(guide_batch_size, bool) and guide_batch_size >= 1,
            "guide_batch_size",
            guide_batch_size,
            "a whole number of texts >= 1",
        )
        self.guide_path = None if guide is None else str(guide)
        self.temperature = temperature
        self.margin_strategy = margin_strategy
        self.margin = margin
        self.contrast_anchors = contrast_anchors
        self.contrast_positives = contrast_positives
        self.guide_batch_size = guide_batch_size
        # Plain attributes, not submodules: the guide is neither trained nor saved, and its cache is no state.
        self.__dict__["_guide"] = None
        # (kind, text) -> the guide's [D'] embedding, on the CPU. One frozen guide per loss, so the key needs no
        # weights. Its size is bounded by the training data: one vector per distinct query and document text.
        self.__dict__["_cache"] = {}
        self._masked = torch.zeros((), dtype=torch.long)

    def forward(self, queries: Tensor, documents: Tensor) -> Tensor:
        raise LitEmbedError(
            "loss=gist needs the guide's embeddings of the batch's texts, which a loss that calls it on embeddings "
            "alone cannot give it: wrap it only in a loss that calls embeddings_loss (loss=cached_gist does)."
        )

    def embeddings_loss(self, encoder: nn.Module, batch: PairBatch, queries: Tensor, documents: Tensor) -> Tensor:
        if getattr(batch, "positives", None) is not None:
            # Further positives follow the hard negatives; GIST would score them as negatives.
            raise LitEmbedError(
                "loss=gist takes one positive per query, and these batches hold several (data.multi_positive): "
                "set data.multi_positive=false, or use loss=mnrl."
            )
        guide = self.guide(encoder)
        with torch.no_grad():
            guide_queries = self._guide_embeddings(guide, batch.queries, "query").to(queries.device)  # [B, D']
            guide_documents = self._guide_embeddings(guide, batch.documents, "document").to(queries.device)
        loss, self._masked = gist(
            queries,
            documents,
            guide_queries,
            guide_documents,
            self.temperature,
            self.margin_strategy,
            self.margin,
            self.contrast_anchors,
            self.contrast_positives,
        )
        return loss

    def step_metrics(self) -> dict[str, Tensor]:
        return {"gist_masked": self._masked}

    def guide(self, encoder: nn.Module) -> Encoder:
        """The frozen guide, loaded on first use onto the student's device."""
        if self._guide is None:
            if self.guide_path is not None:
                guide = Encoder(self.guide_path)
            elif isinstance(encoder, Encoder):
                # Loaded again from where the student came from, not copied from it: after a resume the student
                # holds trained weights, and the guide must be the base model as it was at step 0.
                guide = Encoder(**{**encoder.config, "compile": False})
            else:
                raise LitEmbedError(
                    f"loss=gist's default guide is the base model, which a {type(encoder).__name__} is not: set "
                    "loss.guide to a sentence-transformers model path or hub id."
                )
            guide.eval().requires_grad_(False)
            self.__dict__["_guide"] = guide
        device = next(encoder.parameters()).device
        if self._guide.device != device:
            self._guide.to(device)
        return self._guide

    def _guide_embeddings(self, guide: Encoder, side: TokenGroups, kind: TextKind) -> Tensor:
        """``[N, D']``: the guide's embeddings of one side of the batch, each text embedded once per run."""
        if len(side.texts) != len(side):
            if self.guide_path is not None:
                raise LitEmbedError(
                    "loss.guide embeds the batch's texts with its own tokenizer, but this batch carries only the "
                    "student's token ids: build batches with lit_embed's data modules, or set loss.guide=null."
                )
            return side.embed(guide)  # the default guide reads the student's tokens as they are
        cache = self._cache
        new = list(dict.fromkeys(t for t in side.texts if (kind, t) not in cache))
        if new:
            for text, row in zip(new, guide.encode(new, kind, self.guide_batch_size).cpu(), strict=True):
                cache[kind, text] = row
        return torch.stack([cache[kind, t] for t in side.texts])

    def extra_repr(self) -> str:
        return (
            f"guide={self.guide_path!r}, temperature={self.temperature}, margin_strategy={self.margin_strategy!r}, "
            f"margin={self.margin}, contrast_anchors={self.contrast_anchors}, "
            f"contrast_positives={self.contrast_positives}"
        )
