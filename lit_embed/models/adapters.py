"""Adapters: small heads trained on top of a frozen encoder's embeddings (:mod:`lit_embed.models.adapted`).

``LinearAdapter`` and ``MLPAdapter`` have the parameter names of LlamaIndex's ``LinearLayer`` / ``TwoLayerNN``,
so their weights load in LlamaIndex's ``AdapterEmbeddingModel`` unchanged, and both start as the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_embed.errors import InvalidValueError, check, is_bool, is_int

Transform = Literal["query", "both"]
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leaky_relu": F.leaky_relu,
}


# The adapter is built by the encoder wrapper, after Hydra's instantiate: its errors name the ``adapter.`` keys in full.


def check_head_sizes(**sizes: int | None) -> None:
    """Each size is a whole number >= 1 (``out_dim`` may be None: the encoder's size)."""
    for key, size in sizes.items():
        allowed = "a whole number >= 1" + (", or null for the encoder's size" if key == "out_dim" else "")
        check(size is None and key == "out_dim" or is_int(size) and size >= 1, f"adapter.{key}", size, allowed)


def check_transform(transform: str | None) -> None:
    allowed = "query, both, or null (query when the sizes match)"
    check(transform in ("query", "both", None), "adapter.transform", transform, allowed)


class LinearAdapter(nn.Module):
    """``x -> W x (+ b)``, starting as the identity (or, when ``out_dim < in_dim``, the first ``out_dim`` axes).

    Args:
        in_dim: embedding size of the encoder.
        out_dim: output size (None = ``in_dim``).
        bias: learn a bias too.
        transform: what it maps, read by :class:`AdaptedEncoder`: ``"query"`` (stored document vectors stay
            valid; needs ``out_dim == in_dim``), ``"both"``, or None = ``query`` when the sizes match.
    """

    def __init__(
        self, in_dim: int, out_dim: int | None = None, bias: bool = False, transform: Transform | None = None
    ) -> None:
        super().__init__()
        check_head_sizes(out_dim=out_dim)
        check_transform(transform)
        check(is_bool(bias), "adapter.bias", bias, "true or false")
        self.in_dim, self.out_dim, self.bias = in_dim, out_dim or in_dim, bias
        self.transform = transform
        self.linear = nn.Linear(in_dim, self.out_dim, bias=bias)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(self.out_dim, in_dim))
            if bias:
                self.linear.bias.zero_()

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.linear(embeddings)

    def init_args(self) -> dict[str, Any]:
        """The arguments that rebuild this adapter (``in_dim`` aside)."""
        return {"out_dim": self.out_dim, "bias": self.bias, "transform": self.transform}

    # The class in llama_index.embeddings.adapter.utils that loads these weights (AdapterEmbeddingModel's adapter_cls).
    llamaindex_class = "LinearLayer"

    def llamaindex_config(self) -> dict[str, Any]:
        """LlamaIndex's ``LinearLayer`` ``config.json`` for these weights."""
        return {"in_features": self.in_dim, "out_features": self.out_dim, "bias": self.bias}


class MLPAdapter(nn.Module):
    """``x -> x + r * W2 act(W1 x + b1) + b2`` with ``r`` starting at 0, so training starts from the identity.

    Without the residual (or when ``out_dim`` differs from ``in_dim``) it is the plain two-layer network.

    Args:
        in_dim: embedding size of the encoder.
        hidden_dim: width of the hidden layer.
        out_dim: output size (None = ``in_dim``).
        activation: ``relu`` (exportable to plain sentence-transformers), ``tanh``, ``sigmoid`` or ``leaky_relu``.
        residual: add the input back, weighted by a learned scalar that starts at 0.
        transform: what it maps, as for :class:`LinearAdapter`.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 1024,
        out_dim: int | None = None,
        activation: str = "relu",
        residual: bool = True,
        transform: Transform | None = None,
    ) -> None:
        super().__init__()
        check_head_sizes(out_dim=out_dim, hidden_dim=hidden_dim)
        check_transform(transform)
        check(is_bool(residual), "adapter.residual", residual, "true or false")
        self.transform = transform
        if activation not in ACTIVATIONS:
            raise InvalidValueError("adapter.activation", activation, f"one of {', '.join(sorted(ACTIVATIONS))}")
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim or in_dim
        self.activation = activation
        self.residual = residual and self.out_dim == in_dim
        self.linear1 = nn.Linear(in_dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, self.out_dim)
        self.residual_weight = nn.Parameter(torch.zeros(1))

    def forward(self, embeddings: Tensor) -> Tensor:
        out = self.linear2(ACTIVATIONS[self.activation](self.linear1(embeddings)))
        return embeddings + self.residual_weight * out if self.residual else out

    def init_args(self) -> dict[str, Any]:
        """The arguments that rebuild this adapter (``in_dim`` aside)."""
        return {
            "hidden_dim": self.hidden_dim,
            "out_dim": self.out_dim,
            "activation": self.activation,
            "residual": self.residual,
            "transform": self.transform,
        }

    llamaindex_class = "TwoLayerNN"

    def llamaindex_config(self) -> dict[str, Any]:
        """LlamaIndex's ``TwoLayerNN`` ``config.json`` for these weights."""
        return {
            "in_features": self.in_dim,
            "hidden_features": self.hidden_dim,
            "out_features": self.out_dim,
            "bias": True,
            "activation_fn_str": self.activation,
            "add_residual": self.residual,
        }
