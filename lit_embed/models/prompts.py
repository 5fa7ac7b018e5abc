"""The prompts a sentence-transformers model puts before its texts, chosen as ``encode_query`` /
``encode_document`` choose them. No torch here: the ONNX embedder and the LlamaIndex engines read them too."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

# encode_document() looks for these prompt names, in this order; we read a saved prompt the same way.
DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")


def prompt_for(prompts: Mapping[str, str], kind: str) -> str:
    """The prompt for a ``"query"`` or ``"document"`` text ("" when the model has none)."""
    names = ("query",) if kind == "query" else DOCUMENT_PROMPT_NAMES
    return next((prompts[name] for name in names if name in prompts), "")


def saved_prompts(model_dir: str | os.PathLike) -> dict[str, str]:
    """The ``prompts`` a saved model's ``config_sentence_transformers.json`` holds ({} without any)."""
    config = Path(model_dir) / "config_sentence_transformers.json"
    if not config.is_file():
        return {}
    return json.loads(config.read_text(encoding="utf-8")).get("prompts") or {}
