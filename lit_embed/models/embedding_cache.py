"""A frozen encoder's embeddings of a list of texts, computed once and kept on disk across runs.

Adapter training (the base under the head) and GIST (the guide) both run a frozen model over the training texts;
each list of texts is embedded once, saved atomically with the SHA-256 of its bytes, and read back by any later run
with the same model once it matches them. A file that does not (cut short, overwritten, unreadable) is embedded again
and rewritten, with one warning naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from lit_embed.files import open_atomic
from lit_embed.models.encoder import Encoder, TextKind

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/lit_embed/embeddings"


def cached_embeddings(
    encoder: Encoder, texts: Sequence[str], kind: TextKind, batch_size: int, cache_dir: str | os.PathLike | None
) -> Tensor:
    """``[len(texts), D]`` on the CPU: ``encoder``'s embeddings of ``texts``, from ``cache_dir`` when saved there.

    The encoder must be frozen and already on its device; ``cache_dir=None`` computes them without a disk cache.
    """
    path = cache_path(encoder, texts, kind, cache_dir)
    if path is not None and path.is_file():
        embeddings, problem = _read(path, len(texts))
        if problem is None:
            return embeddings
        log.warning("%s is not whole (%s): embedding its %d texts again.", path, problem, len(texts))
    embeddings = encoder.encode(list(texts), kind, batch_size).cpu()
    if path is not None:
        _write(path, embeddings)
    return embeddings


def _read(path: Path, rows: int) -> tuple[Tensor | None, str | None]:
    """``(embeddings, None)`` when the file is whole, else ``(None, why)``."""
    try:
        with warnings.catch_warnings():  # a damaged file's warnings from the unpickler: the one logged says it all
            warnings.simplefilter("ignore")
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, ValueError, LookupError, EOFError, OSError, pickle.UnpicklingError) as err:
        return None, f"torch.load fails: {type(err).__name__}"
    embeddings = saved.get("embeddings") if isinstance(saved, dict) else None
    if not isinstance(embeddings, Tensor) or embeddings.dim() != 2:
        return None, "it does not hold a [texts, dimensions] tensor with its checksum"
    if embeddings.shape[0] != rows:  # the width is the checksum's to prove: not every model reports its own
        return None, f"it holds {embeddings.shape[0]:,} embeddings for {rows:,} texts"
    if saved.get("sha256") != _sha256(embeddings):
        return None, "its embeddings do not match their SHA-256: the file changed after it was written"
    return embeddings, None


def _write(path: Path, embeddings: Tensor) -> None:
    with open_atomic(path, binary=True) as f:  # runs sharing the cache never read half a file
        torch.save({"embeddings": embeddings, "sha256": _sha256(embeddings)}, f)


def _sha256(embeddings: Tensor) -> str:
    """Of the shape, type and bytes: every byte is read, about a second per 1.7 GB of embeddings."""
    digest = hashlib.sha256(json.dumps([list(embeddings.shape), str(embeddings.dtype)]).encode())
    digest.update(embeddings.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


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
