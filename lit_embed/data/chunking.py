"""Documents into chunks the way LlamaIndex's ``SentenceSplitter`` cuts them, counted in the embedding model's tokens.

Text is split on paragraphs (blank lines), then sentences, then lines, clauses, words and, for a word longer than a
chunk, characters, going one level finer only for a piece that does not fit alone. The pieces are then merged in
order into chunks of at most ``chunk_size`` tokens, and each chunk starts with the last pieces of the one before, up
to ``chunk_overlap`` tokens. Unlike ``SentenceSplitter``, the overlap gives way when it would push a chunk over
``chunk_size``, and every chunk is counted again whole, so no chunk is longer than the model reads.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from lit_embed.errors import LitEmbedError

# Each pattern matches where a piece ends, so the pieces put together are the text again, whitespace included.
_LEVELS = (
    re.compile(r"\n[ \t]*\n\s*"),  # paragraphs: a blank line (Markdown's paragraph break)
    re.compile(r"""[.!?…]+["'”’)\]]*\s+|[。！？]+\s*"""),  # sentences
    re.compile(r"\n"),  # lines: list items, table rows, headings that end without a full stop
    re.compile(r"[,;:，；、]\s+"),  # clauses
    re.compile(r"\s+"),  # words
)

Counter = Callable[[Sequence[str]], list[int]]  # texts -> tokens of each, special tokens not counted


def split_text(text: str, count_tokens: Counter, chunk_size: int, chunk_overlap: int = 0) -> list[str]:
    """The chunks of ``text``, each at most ``chunk_size`` tokens, stripped, none empty.

    Args:
        text: one document.
        count_tokens: the tokens of each text (see :class:`TokenCounter`).
        chunk_size: tokens per chunk at most.
        chunk_overlap: tokens of the previous chunk's end that a chunk repeats at its start, at most.
    """
    if chunk_size < 1 or not 0 <= chunk_overlap < chunk_size:
        raise LitEmbedError(
            f"chunk_size={chunk_size}, chunk_overlap={chunk_overlap}: need chunk_size >= 1 and 0 <= overlap < size."
        )
    if not text.strip():
        return []
    chunks = [chunk.strip() for chunk in _merge(_pieces(text, count_tokens, chunk_size), chunk_size, chunk_overlap)]
    chunks = [chunk for chunk in chunks if chunk]
    # Tokens of pieces need not add up to the tokens of their join (a BPE merge across a boundary): count again.
    sizes = count_tokens(chunks)
    if all(size <= chunk_size for size in sizes):
        return chunks
    fitted = []
    for chunk, size in zip(chunks, sizes, strict=True):
        if size <= chunk_size or len(chunk) == 1:
            fitted.append(chunk)
        else:  # smaller pieces, so shorter chunks: this ends
            fitted += split_text(chunk, count_tokens, max(1, 2 * chunk_size - size))
    return fitted


def _pieces(text: str, count_tokens: Counter, chunk_size: int, level: int = 0) -> list[tuple[str, int]]:
    """``(piece, tokens)`` in order, each piece at most ``chunk_size`` tokens; finer levels only where needed."""
    if level == 0:
        (size,) = count_tokens([text])
        if size <= chunk_size:
            return [(text, size)]
    while level < len(_LEVELS):
        parts = _split_after(text, _LEVELS[level])
        level += 1
        if len(parts) > 1:
            break
    else:
        parts = list(text)  # one word longer than a chunk: its characters
    pieces = []
    for part, size in zip(parts, count_tokens(parts), strict=True):
        if size <= chunk_size or len(part) == 1:
            pieces.append((part, size))
        else:
            pieces += _pieces(part, count_tokens, chunk_size, level)
    return pieces


def _split_after(text: str, separator: re.Pattern[str]) -> list[str]:
    ends = [match.end() for match in separator.finditer(text) if match.end() < len(text)]
    return [text[start:end] for start, end in zip([0, *ends], [*ends, len(text)], strict=True)]


def _merge(pieces: list[tuple[str, int]], chunk_size: int, chunk_overlap: int) -> list[str]:
    """Greedy packing in order; a new chunk starts with the previous one's last pieces up to ``chunk_overlap``."""
    chunks: list[str] = []
    current: list[tuple[str, int]] = []
    tokens, fresh = 0, 0  # tokens in the chunk; how many of its pieces are new (not overlap)
    for piece, size in pieces:
        if tokens + size > chunk_size and fresh:
            chunks.append("".join(text for text, _ in current))
            overlap: list[tuple[str, int]] = []
            for text, length in reversed(current):
                if sum(n for _, n in overlap) + length > chunk_overlap:
                    break
                overlap.insert(0, (text, length))
            current, tokens, fresh = overlap, sum(n for _, n in overlap), 0
        while current and not fresh and tokens + size > chunk_size:
            tokens -= current.pop(0)[1]  # the overlap gives way rather than push the chunk over chunk_size
        current.append((piece, size))
        tokens, fresh = tokens + size, fresh + 1
    if fresh:
        chunks.append("".join(text for text, _ in current))
    return chunks


class TokenCounter:
    """Counts tokens as an embedding model's tokenizer does, and knows how long a chunk that model reads whole is.

    Args:
        model: a sentence-transformers model directory (or any folder with ``tokenizer.json``), a ``tokenizer.json``
            file, or a Hugging Face tokenizer name or path (through ``transformers``).
    """

    def __init__(self, model: str | os.PathLike) -> None:
        path = Path(model)
        self.name = str(model)
        file = path / "tokenizer.json" if path.is_dir() else path
        if file.is_file() and file.suffix == ".json":
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(file))
            # A saved tokenizer.json often pads and truncates (MiniLM's to 128); counting needs neither.
            tokenizer.no_truncation()
            tokenizer.no_padding()
            self._count = lambda texts: [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
            self.special_tokens = len(tokenizer.encode("", add_special_tokens=True).ids)
        elif path.exists() or not _looks_like_a_hub_id(str(model)):
            raise LitEmbedError(
                f"{model}: no tokenizer here. Pass a sentence-transformers model folder (with tokenizer.json), a "
                "tokenizer.json file, or a Hugging Face model name."
            )
        else:
            from transformers import AutoTokenizer

            auto = AutoTokenizer.from_pretrained(str(model))
            self._count = lambda texts: [len(ids) for ids in auto(list(texts), add_special_tokens=False)["input_ids"]]
            self.special_tokens = len(auto("")["input_ids"])
        self.max_seq_length = _max_seq_length(path) if path.is_dir() else None

    def __call__(self, texts: Sequence[str]) -> list[int]:
        return self._count(list(texts)) if texts else []

    def chunk_limit(self, document_prompt: str = "") -> int | None:
        """The most tokens of text the model embeds without cutting: its ``max_seq_length`` less the special tokens
        and the ``document_prompt`` it puts in front (None when the folder does not say)."""
        if self.max_seq_length is None:
            return None
        return self.max_seq_length - self.special_tokens - (self([document_prompt])[0] if document_prompt else 0)


def _max_seq_length(path: Path) -> int | None:
    """What sentence-transformers reads of a model folder (``sentence_bert_config.json``), else the tokenizer's."""
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        file = path / name
        if file.is_file():
            value = json.loads(file.read_text(encoding="utf-8")).get(key)
            # transformers writes a huge placeholder (1e30) when the tokenizer has no limit.
            if isinstance(value, int) and 0 < value < 1_000_000:
                return value
    return None


def _looks_like_a_hub_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None and not name.endswith(".json")
