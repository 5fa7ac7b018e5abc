"""What every loss is: a function of an embedded batch to a scalar."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from lit_embed.batch import Embedded
from lit_embed.errors import LitEmbedError
from lit_embed.models.encoder import TextKind


class EmbeddingLoss(nn.Module):
    """A loss of an embedded batch: ``loss(Embedded) -> scalar``.

    :class:`~lit_embed.batch.Embedded` holds the queries' ``[B, D]`` and the documents' ``[B + N, D]`` embeddings
    (document ``i < B`` is query ``i``'s positive, the ``N`` after them hard negatives) and the batch they came from:
    which documents belong to which query, the teacher's scores where there are any, the texts. How the embeddings
    were made (in one pass, or by GradCache in mini-batches) is no concern of the loss, so every loss trains with
    every step (:mod:`lit_embed.training.steps`) and inside Matryoshka.
    """

    def forward(self, embedded: Embedded) -> Tensor:
        raise NotImplementedError

    def prepare(self, encoder: nn.Module, texts: Mapping[TextKind, Sequence[str]]) -> None:
        """Called once before training with every training text, for a loss that works on them ahead (GIST's guide)."""

    def scores_several_positives(self) -> bool:
        """Whether the loss trains rows with several positives (``data.multi_positive``) as positives."""
        return False

    def step_metrics(self) -> dict[str, Tensor]:
        """What the last call measured besides the loss; the module logs each as ``train/<name>``."""
        return {}


def check_several_positives(loss: nn.Module, multi_positive: bool) -> None:
    """Refuses, before training, rows with several positives for a loss that would take them for negatives."""
    if multi_positive and not (isinstance(loss, EmbeddingLoss) and loss.scores_several_positives()):
        raise LitEmbedError(
            f"data.multi_positive=true gives each row several positives, but {type(loss).__name__} scores one per "
            "query (loss.directions other than [query_to_doc] included): train them with loss=mnrl, cached_mnrl or "
            "matryoshka, or set data.multi_positive=false."
        )
