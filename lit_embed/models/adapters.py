"""Adapters: small heads trained on top of a frozen encoder's embeddings.

``LinearAdapter`` and ``MLPAdapter`` have the parameter names of LlamaIndex's ``LinearLayer`` / ``TwoLayerNN``,
so their weights load in LlamaIndex's ``AdapterEmbeddingModel`` unchanged, and both start as the identity.
``AdaptedEncoder`` puts one behind a frozen :class:`~lit_embed.models.encoder.Encoder` whose embeddings are
computed once per text and cached on disk, so training the adapter never runs the encoder again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from lit_embed.errors import LitEmbedError
from lit_embed.files import open_atomic
from lit_embed.models.encoder import Encoder, TextKind
from lit_embed.models.precomputed import PrecomputedEmbeddings

log = logging.getLogger(__name__)

Transform = Literal["query", "both"]
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leaky_relu": F.leaky_relu,
}


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
        self.in_dim, self.out_dim, self.bias = in_dim, out_dim or in_dim, bias
        self.transform = transform
        self.linear = nn.Linear(in_dim, self.out_dim, bias=bias)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(self.out_dim, in_dim))
            if bias:
                self.linear.bias.zero_()

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.linear(embeddings)

    def llamaindex_config(self) -> tuple[str, dict[str, Any]]:
        """LlamaIndex's class name and ``config.json`` for these weights."""
        return "LinearLayer", {"in_features": self.in_dim, "out_features": self.out_dim, "bias": self.bias}


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
        self.transform = transform
        if activation not in ACTIVATIONS:
            raise LitEmbedError(f"adapter activation {activation!r} is not one of {sorted(ACTIVATIONS)}.")
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim or in_dim
        self.activation = activation
        self.residual = residual and self.out_dim == in_dim
        self.linear1 = nn.Linear(in_dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, self.out_dim)
        self.residual_weight = nn.Parameter(torch.zeros(1))

    def forward(self, embeddings: Tensor) -> Tensor:
        out = self.linear2(ACTIVATIONS[self.activation](self.linear1(embeddings)))
        return embeddings + self.residual_weight * out if self.residual else out

    def llamaindex_config(self) -> tuple[str, dict[str, Any]]:
        config = {
            "in_features": self.in_dim,
            "hidden_features": self.hidden_dim,
            "out_features": self.out_dim,
            "bias": True,
            "activation_fn_str": self.activation,
            "add_residual": self.residual,
        }
        return "TwoLayerNN", config


class AdaptedEncoder(nn.Module):
    """A frozen encoder followed by a trainable adapter, with the encoder's embeddings cached per text.

    It is a drop-in for :class:`Encoder` in the LightningModule, the data module and the IR callback:
    ``tokenize`` embeds each new text once with the frozen encoder (or loads it from ``cache_dir``) and returns
    its row in the in-memory table, and ``forward`` is a table lookup followed by the adapter. Only the adapter
    is a registered submodule, so only it trains and only it is saved in checkpoints.

    Args:
        base: the frozen encoder, or vectors computed elsewhere (:class:`PrecomputedEmbeddings`).
        adapter: ``adapter(in_dim=...) -> nn.Module`` (a Hydra partial of :class:`LinearAdapter` /
            :class:`MLPAdapter`); its ``transform`` says whether documents are mapped too.
        cache_dir: where base embeddings are cached across runs (None = no disk cache).
        batch_size: texts per encoder call when filling the cache.
    """

    def __init__(
        self,
        base: Encoder | PrecomputedEmbeddings,
        adapter: Callable[..., nn.Module],
        cache_dir: str | os.PathLike | None = "~/.cache/lit_embed/embeddings",
        batch_size: int = 64,
    ) -> None:
        super().__init__()
        self.__dict__["base"] = base.requires_grad_(False).eval()  # not a submodule: frozen, not checkpointed
        self.adapter = adapter(in_dim=base.embedding_dim)
        same_size = self.adapter.out_dim == base.embedding_dim
        self.transform = self.adapter.transform or ("query" if same_size else "both")
        if self.transform == "query" and not same_size:
            raise LitEmbedError(
                f"adapter.transform=query needs the adapter to keep the embedding size ({base.embedding_dim}), "
                f"but out_dim is {self.adapter.out_dim}: set adapter.transform=both so documents are mapped too."
            )
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.batch_size = batch_size
        self.rows: dict[str, dict[str, int]] = {"query": {}, "document": {}}
        self.register_buffer("query_table", torch.empty(0, base.embedding_dim), persistent=False)
        self.register_buffer("document_table", torch.empty(0, base.embedding_dim), persistent=False)
        self.config = {
            "base": base.config,
            "base_class": type(base).__name__,
            "adapter": {"class": type(self.adapter).__name__, **_init_args(self.adapter), "transform": self.transform},
        }

    @property
    def embedding_dim(self) -> int:
        return self.adapter.out_dim

    @property
    def pad_token_id(self) -> int:
        return 0

    @property
    def max_seq_length(self) -> int:
        return self.base.max_seq_length

    @property
    def device(self) -> torch.device:
        return self.query_table.device

    def _table(self, kind: TextKind) -> Tensor:
        return self.query_table if kind == "query" else self.document_table

    def tokenize(self, texts: Sequence[str], kind: TextKind) -> dict[str, Any]:
        """Rows of the embedding table for ``texts`` (new texts are embedded by the frozen encoder first)."""
        rows = self.rows[kind]
        new = list(dict.fromkeys(t for t in texts if t not in rows))
        if new:
            embeddings = self._base_embeddings(new, kind).to(self.device)
            for text in new:
                rows[text] = len(rows)
            name = f"{kind}_table"
            setattr(self, name, torch.cat([getattr(self, name), embeddings]))
        ids = torch.tensor([[rows[t]] for t in texts], dtype=torch.long)
        return {"text_ids": ids, "attention_mask": torch.ones_like(ids), "kind": kind}

    def _base_embeddings(self, texts: list[str], kind: TextKind) -> Tensor:
        path = self._cache_path(texts, kind)
        if path is not None and path.is_file():
            return torch.load(path, weights_only=True)
        embeddings = self.base.to(self.device).encode(texts, kind, self.batch_size).cpu()
        if path is not None:
            with open_atomic(path, binary=True) as f:  # runs sharing the cache never read half a file
                torch.save(embeddings, f)
        return embeddings

    def _cache_path(self, texts: list[str], kind: TextKind) -> Path | None:
        """One file per (model, weights, prompt, max length, texts): any change gives a new key."""
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256()
        digest.update(json.dumps(self.base.config, sort_keys=True, default=str).encode())
        digest.update(json.dumps([kind, self.base.prompt(kind), self.base.max_seq_length]).encode())
        for tensor in self.base.state_dict().values():
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()[:4096])
        for text in texts:
            digest.update(text.encode())
            digest.update(b"\0")
        return self.cache_dir / f"{kind}-{digest.hexdigest()[:32]}.pt"

    def adapts(self, kind: TextKind) -> bool:
        return kind == "query" or self.transform == "both"

    def forward(self, features: dict[str, Any]) -> Tensor:
        kind = features["kind"]
        embeddings = self._table(kind)[features["text_ids"][:, 0]]  # [B, D] cached base embeddings
        return self.adapter(embeddings) if self.adapts(kind) else embeddings

    @torch.no_grad()
    def encode(self, texts: Sequence[str], kind: TextKind, batch_size: int = 64) -> Tensor:
        return self(self.tokenize(texts, kind)).float()

    def save(self, path: str | os.PathLike) -> None:
        """A sentence-transformers directory: the base model, then the adapter as plain ``Dense`` modules.

        With ``transform=query`` the adapter sits on a ``Router`` query route, so ``encode_query`` maps queries
        and ``encode_document`` returns the base model's document embeddings unchanged.
        """
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.base.modules import Router

        if not isinstance(self.base, Encoder):
            # Vectors from elsewhere (an embedding API): there is no text model to save, only the head to apply
            # to that API's vectors.
            path = Path(path)
            path.mkdir(parents=True, exist_ok=True)
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in self.adapter.state_dict().items()},
                str(path / "adapter.safetensors"),
            )
            (path / "adapter_config.json").write_text(json.dumps(self.config["adapter"], indent=2))
            return
        head = dense_modules(self.adapter)
        if self.transform == "query":
            head = [Router.for_query_document(query_modules=head, document_modules=[])]
        model = SentenceTransformer(modules=[*self.base.model, *head], device="cpu")
        model.prompts = dict(self.base.model.prompts)
        model.save(str(path), safe_serialization=True)

    def save_llamaindex_adapter(self, path: str | os.PathLike) -> bool:
        """Writes ``config.json`` + ``pytorch_model.bin`` as LlamaIndex's adapters save themselves.

        LlamaIndex's ``AdapterEmbeddingModel`` maps queries only, so only ``transform=query`` adapters can be
        written; returns whether one was.
        """
        if self.transform != "query":
            return False
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        _, config = self.adapter.llamaindex_config()
        (path / "config.json").write_text(json.dumps(config))
        state = {k: v.detach().cpu().clone() for k, v in self.adapter.state_dict().items()}
        torch.save(state, path / "pytorch_model.bin")  # LlamaIndex's file name; tensors only
        return True


def _init_args(adapter: nn.Module) -> dict[str, Any]:
    if isinstance(adapter, LinearAdapter):
        return {"out_dim": adapter.out_dim, "bias": adapter.bias}
    return {
        "hidden_dim": adapter.hidden_dim,
        "out_dim": adapter.out_dim,
        "activation": adapter.activation,
        "residual": adapter.residual,
    }


def dense_modules(adapter: nn.Module) -> list[nn.Module]:
    """The adapter as sentence-transformers ``Dense`` modules, which load without lit_embed.

    The MLP's residual ``x + r W2 relu(W1 x + b1) + b2`` has no ``Dense`` of its own; it is written exactly as
    ``relu([W1; I; -I] x + [b1; 0; 0])`` followed by ``[r W2, I, -I]``, using ``relu(x) - relu(-x) = x``.
    """
    from sentence_transformers.base.modules import Dense

    identity = nn.Identity()
    with torch.no_grad():
        if isinstance(adapter, LinearAdapter):
            lin = adapter.linear
            return [Dense(adapter.in_dim, adapter.out_dim, adapter.bias, identity, lin.weight.clone(), _bias(lin))]
        w1, b1 = adapter.linear1.weight, adapter.linear1.bias
        w2, b2 = adapter.linear2.weight, adapter.linear2.bias
        if not adapter.residual:
            act = {"relu": nn.ReLU(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(), "leaky_relu": nn.LeakyReLU()}
            hidden = Dense(adapter.in_dim, adapter.hidden_dim, True, act[adapter.activation], w1.clone(), b1.clone())
            return [hidden, Dense(adapter.hidden_dim, adapter.out_dim, True, identity, w2.clone(), b2.clone())]
        if adapter.activation != "relu":
            raise LitEmbedError(
                "a residual MLPAdapter can be written as plain sentence-transformers modules only with "
                "activation=relu; train with adapter.activation=relu or adapter.residual=false."
            )
        eye = torch.eye(adapter.in_dim)
        zeros = torch.zeros(adapter.in_dim)
        r = adapter.residual_weight
        first = Dense(
            adapter.in_dim,
            adapter.hidden_dim + 2 * adapter.in_dim,
            True,
            nn.ReLU(),
            torch.cat([w1, eye, -eye]),
            torch.cat([b1, zeros, zeros]),
        )
        second = Dense(
            adapter.hidden_dim + 2 * adapter.in_dim,
            adapter.out_dim,
            True,
            identity,
            torch.cat([r * w2, eye, -eye], dim=1),
            r * b2,
        )
        return [first, second]


def _bias(linear: nn.Linear) -> Tensor | None:
    return linear.bias.clone() if linear.bias is not None else None
