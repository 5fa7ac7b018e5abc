"""GISTEmbed: in-batch negatives chosen by a guide model, which drops those it scores as likely false negatives."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_embed.batch import Embedded, PackedTexts
from lit_embed.distributed import all_gather_rows, rank_and_world
from lit_embed.errors import LitEmbedError, check, is_bool, is_int, is_number
from lit_embed.losses.base import EmbeddingLoss
from lit_embed.models.embedding_cache import DEFAULT_CACHE_DIR, cached_embeddings
from lit_embed.models.encoder import Encoder, TextKind

log = logging.getLogger(__name__)

MarginStrategy = Literal["absolute", "relative"]
PREPARE_CHUNK = 8192  # texts per file of the guide's disk cache: a long first run keeps what it has done


def gist(
    queries: Tensor,
    documents: Tensor,
    guide_queries: Tensor,
    guide_documents: Tensor,
    temperature: float = 0.05,
    margin_strategy: MarginStrategy = "absolute",
    margin: float = 0.0,
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    first_positive: int = 0,
    num_positives: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy of each query against the candidates its guide does not judge to be false negatives.

    The candidates of query ``i`` are every positive (query-document), every other query (query-query, with
    ``contrast_anchors``), every other positive (positive-positive, with ``contrast_positives``) and every hard
    negative, as in sentence-transformers' ``GISTEmbedLoss``. A candidate is dropped (its score set to -inf) when
    the guide scores it above the guide's score of query ``i``'s own positive less the margin: ``margin`` with
    the "absolute" strategy, ``|positive score| * margin`` with "relative". Query ``i``'s positive is never dropped.

    Args:
        queries: ``[B, D]`` the student's query embeddings.
        documents: ``[P + N, D]`` the student's documents: ``P`` positives, then ``N`` hard negatives (candidates
            for every query). Row ``first_positive + i`` is query ``i``'s positive.
        guide_queries: ``[B, D']`` the guide's embeddings of the same queries.
        guide_documents: ``[P + N, D']`` the guide's embeddings of the same documents.
        temperature: divides the cosine similarities (0.05 = MNRL's scale 20).
        margin_strategy: "absolute" or "relative" (see above).
        margin: how far below the positive's guide score a candidate must stay to be kept.
        contrast_anchors: include the query-query candidates (this call's queries).
        contrast_positives: include the positive-positive candidates (all ``P`` positives).
        first_positive: the row of query 0's positive; non-zero when the documents are gathered from several
            devices, as sentence-transformers' ``gather_across_devices`` does.
        num_positives: ``P``; None = ``B``, one device's batch.

    Returns:
        The mean loss over the ``B`` queries, and how many candidates the guide dropped (an integer tensor;
        a query itself and its own positive, never candidates of their own row, are not counted).
    """
    size = queries.size(0)
    num_positives = size if num_positives is None else num_positives
    if documents.size(0) < first_positive + size or guide_documents.size(0) != documents.size(0):
        raise ValueError(
            f"need one positive per query and the guide's view of every document: {size} queries, "
            f"{documents.size(0)} documents from row {first_positive}, {guide_documents.size(0)} guide documents"
        )
    queries, documents = F.normalize(queries, dim=-1), F.normalize(documents, dim=-1)
    guide_queries, guide_documents = F.normalize(guide_queries, dim=-1), F.normalize(guide_documents, dim=-1)
    positives, guide_positives = documents[:num_positives], guide_documents[:num_positives]  # [P, D], [P, D']
    labels = torch.arange(size, device=queries.device) + first_positive  # query i's positive is column i + first
    own, guide_own = positives[labels], guide_positives[labels]  # [B, D], [B, D']
    guide_positive = (guide_queries * guide_own).sum(dim=-1, keepdim=True)  # [B, 1]
    if margin_strategy == "absolute":
        limit = guide_positive - margin  # [B, 1]
    else:
        limit = guide_positive - guide_positive.abs() * margin
    own_column = F.one_hot(labels, num_positives).bool()  # [B, P]
    itself = torch.eye(size, dtype=torch.bool, device=queries.device)  # [B, B]
    # (student's scores, guide's scores, which entries are the target or the text itself: never dropped or counted)
    blocks = [(queries @ positives.T, guide_queries @ guide_positives.T, own_column, False)]  # [B, P]
    if contrast_anchors:
        blocks.append((queries @ queries.T, guide_queries @ guide_queries.T, itself, True))  # [B, B]
    if contrast_positives:
        blocks.append((own @ positives.T, guide_own @ guide_positives.T, own_column, True))  # [B, P]
    if documents.size(0) > num_positives:
        negatives, guide_negatives = documents[num_positives:], guide_documents[num_positives:]
        blocks.append((queries @ negatives.T, guide_queries @ guide_negatives.T, None, False))  # [B, N]
    scores, masked = [], torch.zeros((), dtype=torch.long, device=queries.device)
    for student, guided, kept, is_itself in blocks:
        dropped = guided > limit  # [B, candidates]
        if kept is not None:
            dropped &= ~kept
        masked = masked + dropped.sum()
        if is_itself:
            dropped |= kept  # a text is no candidate of its own row
        scores.append(student.masked_fill(dropped, -torch.inf))
    logits = torch.cat(scores, dim=1) / temperature  # [B, P (+ B) (+ P) + N]
    # bf16/fp16 logits lose too much precision in the softmax; compute it in at least fp32.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels), masked


class GISTLoss(EmbeddingLoss):
    """GISTEmbed (sentence-transformers' ``GISTEmbedLoss``): MNRL whose in-batch negatives a guide model vets.

    The guide embeds the same texts as the student; candidates it scores above a query's own positive (less the
    margin) are taken for unlabelled positives and left out of that query's softmax. The guide is frozen, kept
    out of the LightningModule's weights (never trained, never in a checkpoint). Before training it embeds every
    training text once (:meth:`prepare`), saved in ``cache_dir`` as adapter training saves its base embeddings,
    so later epochs, resumed runs and reruns on the same data never run it again.

    Args:
        guide: a sentence-transformers model path or hub id; it embeds each text with its own tokenizer and
            prompts. None: the student's base model as loaded at step 0 (no other model, no download).
        temperature: divides the cosine similarities: 0.05, loss=mnrl's scale 20. sentence-transformers' default,
            0.01, trained worse on both datasets measured (README, "Guided in-batch negatives").
        margin_strategy: "absolute" (drop candidates above positive - margin) or "relative" (above
            positive - |positive| * margin).
        margin: see ``margin_strategy``; 0 drops only candidates the guide ranks above the positive.
        contrast_anchors: other queries are candidates too.
        contrast_positives: other queries' positives are candidates of a query's positive's side too.
        gather_across_devices: under DDP, every device's positives and hard negatives (and the guide's view of
            them) are candidates of every query, as sentence-transformers' option of that name does.
        guide_batch_size: texts the guide embeds at once.
        cache_dir: where the guide's embeddings are kept across runs (None: in memory, for this run only).
    """

    def __init__(
        self,
        guide: str | os.PathLike | None = None,
        temperature: float = 0.05,
        margin_strategy: MarginStrategy = "absolute",
        margin: float = 0.0,
        contrast_anchors: bool = True,
        contrast_positives: bool = True,
        gather_across_devices: bool = False,
        guide_batch_size: int = 64,
        cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
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
            "a positive number that divides the cosine similarities (0.05 = loss=mnrl's scale 20)",
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
        for key, value in (
            ("contrast_anchors", contrast_anchors),
            ("contrast_positives", contrast_positives),
            ("gather_across_devices", gather_across_devices),
        ):
            check(is_bool(value), key, value, "true or false")
        check(
            is_int(guide_batch_size) and guide_batch_size >= 1,
            "guide_batch_size",
            guide_batch_size,
            "a whole number of texts >= 1",
        )
        check(
            cache_dir is None or isinstance(cache_dir, str | os.PathLike) and str(cache_dir) != "",
            "cache_dir",
            cache_dir,
            "a folder for the guide's embeddings, or null to keep them in memory for this run only",
        )
        self.guide_path = None if guide is None else str(guide)
        self.temperature = temperature
        self.margin_strategy = margin_strategy
        self.margin = margin
        self.contrast_anchors = contrast_anchors
        self.contrast_positives = contrast_positives
        self.gather_across_devices = gather_across_devices
        self.guide_batch_size = guide_batch_size
        self.cache_dir = cache_dir
        # Plain attributes, not submodules: the guide is neither trained nor saved, and its embeddings are no state.
        self.__dict__["_guide"] = None
        self.__dict__["_embeddings"] = {"query": GuideTable(), "document": GuideTable()}
        self._masked = torch.zeros((), dtype=torch.long)

    def prepare(self, encoder: nn.Module, texts: Mapping[TextKind, Sequence[str]]) -> None:
        """Embeds every training text with the guide once, from ``cache_dir`` where an earlier run saved them."""
        guide = self.guide(encoder)
        for kind, some in texts.items():
            table = self._embeddings[kind]
            new = table.missing(some)
            for start in range(0, len(new), PREPARE_CHUNK):
                chunk = new[start : start + PREPARE_CHUNK]
                table.add(chunk, cached_embeddings(guide, chunk, kind, self.guide_batch_size, self.cache_dir))
            log.info("loss=gist: the guide holds the embeddings of %d %s texts.", len(table), kind)

    def forward(self, embedded: Embedded) -> Tensor:
        if embedded.positives is not None:
            # Further positives follow the hard negatives; GIST would score them as negatives.
            raise LitEmbedError(
                "loss=gist takes one positive per query, and these batches hold several (data.multi_positive): "
                "set data.multi_positive=false, or use loss=mnrl."
            )
        if embedded.sides is None:
            raise LitEmbedError(
                "loss=gist needs the batch's texts for its guide, and these embeddings come without them: embed "
                "batches with PairBatch.embed (lit_embed's data modules and steps do)."
            )
        queries, documents = embedded.queries, embedded.documents
        guide = self.guide(None, queries.device)
        with torch.no_grad():
            guide_queries = self._guide_embeddings(guide, embedded.sides[0], "query").to(queries.device)  # [B, D']
            guide_documents = self._guide_embeddings(guide, embedded.sides[1], "document").to(queries.device)
        return self.guided_loss(queries, documents, guide_queries, guide_documents)

    def guided_loss(self, queries: Tensor, documents: Tensor, guide_queries: Tensor, guide_documents: Tensor) -> Tensor:
        """The loss of the student's and the guide's embeddings of one batch (see :func:`gist`), gathered if set."""
        size = queries.size(0)
        rank, world = rank_and_world()
        if not self.gather_across_devices or world == 1:
            loss, self._masked = self._loss(queries, documents, guide_queries, guide_documents)
            return loss
        # Positives first, then hard negatives, from every device; the guide's view of them in the same order.
        positives, positives_per_rank = all_gather_rows(documents[:size])  # [sum of B_r, D], with their gradient
        negatives, _ = all_gather_rows(documents[size:])  # [sum of N_r, D]
        guide_positives, _ = all_gather_rows(guide_documents[:size])
        guide_negatives, _ = all_gather_rows(guide_documents[size:])
        loss, self._masked = self._loss(
            queries,
            torch.cat([positives, negatives]),
            guide_queries,
            torch.cat([guide_positives, guide_negatives]),
            first_positive=sum(positives_per_rank[:rank]),
            num_positives=positives.size(0),
        )
        # As loss=mnrl's: DDP's mean of the ranks' gradients becomes the gradient of the global batch's mean.
        return loss * (size * world / positives.size(0))

    def _loss(
        self, queries: Tensor, documents: Tensor, guide_queries: Tensor, guide_documents: Tensor, **rows: int
    ) -> tuple[Tensor, Tensor]:
        return gist(
            queries,
            documents,
            guide_queries,
            guide_documents,
            self.temperature,
            self.margin_strategy,
            self.margin,
            self.contrast_anchors,
            self.contrast_positives,
            **rows,
        )

    def step_metrics(self) -> dict[str, Tensor]:
        return {"gist_masked": self._masked}

    def guide(self, encoder: nn.Module | None, device: torch.device | None = None) -> Encoder:
        """The frozen guide, loaded on first use (from ``encoder``'s config for the default guide), on ``device``
        (None: the encoder's)."""
        if self._guide is None:
            if self.guide_path is not None:
                guide = Encoder(self.guide_path)
            elif isinstance(encoder, Encoder):
                # Loaded again from where the student came from, not copied from it: after a resume the student
                # holds trained weights, and the guide must be the base model as it was at step 0.
                guide = Encoder(**encoder.config)
            elif encoder is None:
                raise LitEmbedError(
                    "loss=gist's default guide is the student's base model, which it loads in prepare(encoder, "
                    "texts): call that before training (the LightningModule does), or set loss.guide."
                )
            else:
                raise LitEmbedError(
                    f"loss=gist's default guide is the base model, which a {type(encoder).__name__} is not: set "
                    "loss.guide to a sentence-transformers model path or hub id."
                )
            guide.eval().requires_grad_(False)
            self.__dict__["_guide"] = guide
        device = device if device is not None else next(encoder.parameters()).device
        if self._guide.device != device:
            self._guide.to(device)
        return self._guide

    def _guide_embeddings(self, guide: Encoder, side: PackedTexts, kind: TextKind) -> Tensor:
        """``[N, D']``: the guide's embeddings of one side of the batch; a text not prepared is embedded now, once."""
        if len(side.texts) != len(side):
            if self.guide_path is not None:
                raise LitEmbedError(
                    "loss.guide embeds the batch's texts with its own tokenizer, but this batch carries only the "
                    "student's token ids: build batches with lit_embed's data modules, or set loss.guide=null."
                )
            return guide(side)  # the default guide reads the student's tokens as they are
        table = self._embeddings[kind]
        new = table.missing(side.texts)
        if new:
            table.add(new, guide.encode(new, kind, self.guide_batch_size).cpu())
        return table.lookup(side.texts)

    def extra_repr(self) -> str:
        return (
            f"guide={self.guide_path!r}, temperature={self.temperature}, margin_strategy={self.margin_strategy!r}, "
            f"margin={self.margin}, contrast_anchors={self.contrast_anchors}, "
            f"contrast_positives={self.contrast_positives}, gather_across_devices={self.gather_across_devices}"
        )


class GuideTable:
    """The guide's embeddings of one kind of text, on the CPU: a row per distinct text, added in chunks.

    Chunks, not one growing tensor: adding a batch's few new texts copies nothing already held.
    """

    def __init__(self) -> None:
        self.rows: dict[str, tuple[int, int]] = {}  # text -> (chunk, row in it)
        self.chunks: list[Tensor] = []

    def __len__(self) -> int:
        return len(self.rows)

    def missing(self, texts: Sequence[str]) -> list[str]:
        """The distinct texts of ``texts`` not held yet, in order."""
        return [t for t in dict.fromkeys(texts) if t not in self.rows]

    def add(self, texts: Sequence[str], embeddings: Tensor) -> None:
        for row, text in enumerate(texts):
            self.rows[text] = (len(self.chunks), row)
        self.chunks.append(embeddings)

    def lookup(self, texts: Sequence[str]) -> Tensor:
        return torch.stack([self.chunks[chunk][row] for chunk, row in map(self.rows.__getitem__, texts)])
