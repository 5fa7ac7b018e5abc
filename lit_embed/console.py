"""What reaches the user's console: our progress and results, not third-party loading bars and notices."""

from __future__ import annotations

import logging

import transformers


def quiet_third_party_output() -> None:
    """No per-file weight-loading bars or save notices from transformers and sentence-transformers."""
    transformers.logging.disable_progress_bar()
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
