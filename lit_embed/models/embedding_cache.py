"""A frozen encoder's embeddings of a list of texts, computed once and kept on disk across runs.

Adapter training (the base under the head) and GIST (the guide) both run a frozen model over the training texts;
each list of texts is embedded once, saved atomically, and read back by any later run with the same model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from lit_embed.files import open_atomic
from lit_embed.models.encoder import Encoder, TextKind

DEFAULT_CACHE_DIR = "~/.cache/lit_embed/embeddings"


def cached_embeddings(
    encoder: Encoder, texts: Sequence[str], kind: TextKind, batch_size: int, cache_dir: str | os.PathLike | None
) -> Tensor:
    """``[len(texts), D]`` on the CPU: ``encoder``'s embeddings of ``texts``, from ``cache_dir`` when saved there.

    The encoder must be frozen and already on its device; ``cache_dir=None`` computes them without a disk cache.
    """
    path = cache_path(encoder, texts, kind, cache_dir)
    if path is not None and path.is_file():
        return torch.load(path, weights_only=True)
    embeddings = encoder.encode(list(texts), kind, batch_size).cpu()
    if path is not None:
        with open_atomic(path, binary=True) as f:  # runs sharing the cache never read half a file
            torch.save(embeddings, f)
    return embeddings


def cache_path(
    encoder: Encoder, texts: Sequence[str], kind: TextKind, cache_dir: str | os.PathLike | None
) -> Path | None:
    """One file per (model, weights, prompt, max length, texts): any change gives a new key."""
    if cache_dir is None:
        return None
    digest = hashlib.sha256()
    digest.update(json.dumps(encoder.config, sort_keys=True, default=str).encode())
    digest.update(json.dumps([kind, encoder.prompt(kind), encoder.max_seq_length]).encode())
    hash_weights(encoder, digest)
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return Path(cache_dir).expanduser() / f"{kind}-{digest.hexdigest()[:32]}.pt"


def hash_weights(encoder: torch.nn.Module, digest: hashlib._Hash) -> None:
    """Feeds every byte of every weight to ``digest``: two finetunes of one model may differ anywhere."""
    for name, tensor in encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
