"""Every read or write of another library's private internals, in one place: when Lightning, transformers or
torch change them, this file is where lit_embed changes.

Each function names what it reaches for and why no public interface gives it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

# transformers' config attribute naming a model's attention implementation: public to set at load time
# (``attn_implementation=``), private to read and change afterwards.


def attention_implementation(config: Any) -> str | None:
    """The attention implementation a loaded transformers model runs ("sdpa", "eager", ...)."""
    return config._attn_implementation


def set_attention_implementation(config: Any, name: str) -> None:
    """Switches a loaded model's attention; its config.json never records it (transformers leaves the private
    attribute out when saving)."""
    config._attn_implementation = name


@contextlib.contextmanager
def dynamo_recompile_limit(limit: int) -> Iterator[None]:
    """Compiled calls inside the block may recompile up to ``limit`` times per code object. transformers wraps
    several layer methods in one decorator function, whose code dynamo caches once for all of them (8 entries by
    default), so a compiled model's training and evaluation calls need more; patched only around those calls."""
    with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, limit)):
        yield
