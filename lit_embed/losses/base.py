"""What every loss is: a pure function of query and document embeddings, and how it gets them from a batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from lit_embed.batch import PairBatch
from lit_embed.errors import LitEmbedError
from lit_embed.models.encoder import TextKind


class EmbeddingLoss(nn.Module):
    """A loss of embeddings: ``loss(queries [B, D], documents [B + N, D]) -> scalar``.

    Document row ``i < B`` is query ``i``'s positive; the ``N`` rows after them are hard negatives. The
    LightningModule calls :meth:`batch_loss`, which embeds the batch with the encoder and calls the loss; a loss
    that must control how the batch is embedded (GradCache) overrides it, and nothing else changes.
    """

    def forward(self, queries: Tensor, documents: Tensor) -> Tensor:
        raise NotImplementedError

    def batch_loss(self, encoder: nn.Module, batch: PairBatch) -> Tensor:
        """The loss of a batch: its queries and documents embedded by ``encoder``, then scored."""
        return self.embeddings_loss(encoder, batch, *batch.embed(encoder))

    def embeddings_loss(self, encoder: nn.Module, batch: PairBatch, queries: Tensor, documents: Tensor) -> Tensor:
        """The loss of a batch's embeddings ``queries [B, D]``, ``documents [B + N, D]``.

        A loss that needs more of the batch than its embeddings (GIST: a guide's view of the same texts) overrides
        this, and GradCache, which embeds the batch its own way, still hands it the batch.
        """
        if batch.positives is not None:
            raise LitEmbedError(
                f"{type(self).__name__} scores one positive per query, but the rows hold several "
                "(data.multi_positive=true): train them with loss=mnrl, cached_mnrl or matryoshka, or set "
                "data.multi_positive=false."
            )
        return self(queries, documents)

    def prepare(self, encoder: nn.Module, texts: Mapping[TextKind, Sequence[str]]) -> None:
        """Called once before training with every training text, for a loss that works on them ahead (GIST's guide)."""

    def scores_several_positives(self) -> bool:
        """Whether :meth:`embeddings_loss` trains rows with several positives (``data.multi_positive``)."""
        return False

    def step_metrics(self) -> dict[str, Tensor]:
        """What the last :meth:`batch_loss` measured besides the loss; the module logs each as ``train/<name>``."""
        return {}


def check_several_positives(loss: nn.Module, multi_positive: bool) -> None:
    """Refuses, before training, rows with several positives for a loss that would take them for negatives."""
    if multi_positive and not (isinstance(loss, EmbeddingLoss) and loss.scores_several_positives()):
        raise LitEmbedError(
            f"data.multi_positive=true gives each row several positives, but {type(loss).__name__} scores one per "
            "query (loss.directions other than [query_to_doc] included): train them with loss=mnrl, cached_mnrl or "
            "matryoshka, or set data.multi_positive=false."
        )
