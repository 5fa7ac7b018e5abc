"""lit_embed: finetune text-embedding models for retrieval on PyTorch Lightning + Hydra."""

from typing import Any

__all__ = ["finetune"]


def __getattr__(name: str) -> Any:
    # ``lit_embed.finetune`` without importing Lightning, Hydra and torch at ``import lit_embed``.
    if name == "finetune":
        from lit_embed.train import finetune

        return finetune
    raise AttributeError(f"module 'lit_embed' has no attribute {name!r}")
