"""Writing finetuned models where other tools can load them."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from lit_embed.models.encoder import Encoder


def to_sentence_transformers(encoder: Encoder, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Saves ``encoder`` as a sentence-transformers directory that ``SentenceTransformer(path)`` loads as is.

    The directory is written next to its destination and renamed into place, so a crash mid-save never
    leaves a half-written model where a good one was.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already holds a model. Choose another output_dir or set overwrite=true.")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        encoder.save(staging)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            staging.rename(path)
            shutil.rmtree(old)
        else:
            staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
