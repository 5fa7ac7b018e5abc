"""The token store: every distinct text tokenized once, kept unpadded on disk, and packed per batch side.

One text's tokens are a row of a flat array of token ids in the smallest integer type that holds the vocabulary
(:class:`~lit_embed.data.ragged.Ragged`); attention masks are derived from the lengths, and type ids that are all 0
(one-segment inputs) are derived too, so a million documents cost their token ids and nothing per text. Token ids
are stored in ``data.cache_dir``, keyed by the texts and by everything of the tokenizer that changes tokens (see
:func:`tokenizer_fingerprint`), so later runs and the other ranks of a job read them instead of tokenizing again.
"""

from __future__ import annotations

import json
import logging
import os
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from lit_embed.batch import PackedTexts
from lit_embed.data.ragged import Ragged, RaggedWriter
from lit_embed.data.store import built_once, content_key

log = logging.getLogger(__name__)

# Texts per tokenizer call: big enough for a fast tokenizer to spread a call over every core.
CHUNK_SIZE = 4096
# Probes whose tokens go into the key, so that a setting that changes tokens and is not in the tokenizer's own
# description (lower-casing in sentence-transformers, an appended EOS) still changes the key.
PROBES = ["Key probe: Ünïcode, numbers 12345, CamelCase and    spaces.", "x"]


class TextTokenizer(Protocol):
    """What the data needs from an encoder (see ``lit_embed.models.encoder.Encoder``).

    ``tokenize`` gives padded features whose ``input_ids`` (with ``attention_mask``) the store keeps unpadded. One
    with a Hugging Face fast ``tokenizer``, a ``vocab_size`` and a ``prompt(kind)`` method has its token ids kept on
    disk (:func:`tokenizer_fingerprint`).
    """

    pad_token_id: int
    max_seq_length: int
    packing_unsupported: str | None  # why it cannot embed packed texts (None: it can)

    def tokenize(self, texts: Sequence[str], kind: str) -> dict[str, Any]: ...


class TokenizedTexts:
    """Every distinct text of one kind (queries or documents), tokenized once and kept unpadded.

    Build one with :func:`tokenize_texts`. Row ``i`` is the text ``texts.text(i)``.

    Args:
        directory: where the arrays are (memory-mapped).
        texts: the texts, as UTF-8 (carried into batches for losses that need the words).
    """

    def __init__(self, directory: Path, texts: Ragged) -> None:
        meta = json.loads((directory / "meta.json").read_text())
        self.texts = texts
        # input_ids, and any other per-token feature that is not all 0 (those are derived: one-segment type ids)
        self.features = {key: Ragged.load(directory, key) for key in meta["stored"]}
        self.shared: dict[str, Any] = meta["shared"]  # per-call values such as the task, equal for every row
        self.lengths = next(iter(self.features.values())).lengths if self.features else np.zeros(0, np.int64)
        if meta["truncated"]:
            log.warning(
                "%d of %d %s texts reach %s and are cut there; raise model.max_seq_length to keep more of them.",
                meta["truncated"],
                len(self),
                meta["kind"],
                meta.get("limit") or f"model.max_seq_length={meta['max_seq_length']} tokens",
            )

    def __len__(self) -> int:
        return len(self.texts)

    def packed(self, indices: Sequence[int], length_groups: int = 0) -> PackedTexts:
        """The chosen rows as one row of tokens (:class:`~lit_embed.batch.PackedTexts`), with their texts;
        ``length_groups`` as there (0: packed where the encoder can)."""
        indices = np.asarray(indices, dtype=np.int64)
        ids = self.features["input_ids"].take(indices)
        others = {
            key: torch.from_numpy(rows.take(indices).values.astype(np.int64))
            for key, rows in self.features.items()
            if key != "input_ids"
        }
        return PackedTexts.from_tokens(
            torch.from_numpy(ids.values.astype(np.int64)),
            ids.lengths.tolist(),
            self.shared,
            token_features=others,
            texts=self.texts.texts(indices),
            length_groups=length_groups,
        )


def tokenize_texts(
    texts: Ragged,
    kind: str,
    tokenizer: TextTokenizer,
    texts_key: str,
    cache_dir: str | os.PathLike | None = None,
    chunk_size: int = CHUNK_SIZE,
    cache_lock: str = "file",
) -> TokenizedTexts:
    """The texts tokenized with the encoder's prompts and truncation, from ``cache_dir`` when they were before.

    Args:
        texts: distinct texts (UTF-8 rows).
        kind: ``"query"`` or ``"document"`` (selects the prompt).
        tokenizer: the encoder.
        texts_key: a key of the texts' content (the training rows' key).
        cache_dir: where token stores are kept; None, or a tokenizer without a fingerprint (an adapter's table
            lookup), tokenizes into a temporary directory of this process.
        chunk_size: texts per tokenizer call.
        cache_lock: how the processes of a job build the store once (:func:`~lit_embed.data.store.built_once`).
    """
    fingerprint = tokenizer_fingerprint(tokenizer, kind)
    if fingerprint is None:
        cache_dir = None
    name = f"tokens-{kind}-{content_key(texts_key, kind, fingerprint)}"

    def build(directory: Path) -> None:
        _tokenize_into(directory, texts, kind, tokenizer, chunk_size)

    what = f"the {kind} token store ({len(texts):,} texts)"
    return TokenizedTexts(built_once(cache_dir, name, build, what, cache_lock), texts)


def _tokenize_into(directory: Path, texts: Ragged, kind: str, tokenizer: TextTokenizer, chunk_size: int) -> None:
    """Tokenizes ``texts`` chunk by chunk and appends each feature's real positions to its ragged array.

    A feature that has been all 0 so far (one-segment type ids) is not written; should a later chunk hold another
    value, its zeros are written first.
    """
    fast = FastTokenIds.verified(tokenizer, kind, texts)
    vocab_size = getattr(tokenizer, "vocab_size", None)
    writers: dict[str, RaggedWriter] = {}
    zeros: list[str] = []  # features seen, all 0 so far
    lengths = array("q", [0])  # every row's offset so far: the zeros a late feature writes first
    shared: dict[str, Any] = {}
    truncated = 0
    for start in range(0, len(texts), chunk_size):
        chunk = texts.texts(range(start, min(start + chunk_size, len(texts))))
        counts, columns, chunk_shared = fast(chunk) if fast else _unpadded(tokenizer.tokenize(chunk, kind))
        shared.update(chunk_shared)
        truncated += int((counts >= tokenizer.max_seq_length).sum())
        offsets = np.concatenate([[0], np.cumsum(counts)])
        for key, values in columns.items():
            if key not in writers and key != "input_ids" and not values.any():
                zeros += [key] if key not in zeros else []
                continue
            if key not in writers:
                writers[key] = RaggedWriter(directory, key, _smallest_dtype(vocab_size, key))
                if key in zeros:  # all 0 until this chunk
                    zeros.remove(key)
                    earlier = np.array(lengths, dtype=np.int64)
                    writers[key].extend(Ragged(np.zeros(earlier[-1], dtype=np.int64), earlier))
            writers[key].extend(Ragged(values, offsets))
        lengths.extend((offsets[1:] + lengths[-1]).tolist())
    for writer in writers.values():
        writer.close()
    meta = {
        "kind": kind,
        "stored": list(writers),
        "shared": shared,
        "truncated": truncated,
        "max_seq_length": tokenizer.max_seq_length,
        # How the limit is named to the user (a reranker's is its pair length less the pair's template).
        "limit": getattr(tokenizer, "text_limit", None),
    }
    (directory / "meta.json").write_text(json.dumps(meta))


Columns = tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]


def _unpadded(features: dict[str, Any]) -> Columns:
    """Padded features -> ``(lengths [n], {feature: real positions, row after row}, per-call values)``."""
    mask = features["attention_mask"].bool().numpy()
    columns, shared = {}, {}
    for key, value in features.items():
        if isinstance(value, Tensor) and value.dim() == 2 and value.shape == mask.shape:
            if key != "attention_mask":
                columns[key] = value.numpy()[mask]
        else:
            shared[key] = value.tolist() if isinstance(value, Tensor) else value
    return mask.sum(1), columns, shared


class FastTokenIds:
    """The encoder's token ids straight from its Rust tokenizer: no padding to tensors and back, no offsets, the
    batch spread over every core by the tokenizer's threads (twice the speed of ``tokenize`` on all-MiniLM-L6-v2).

    Used only where it gives exactly the encoder's ids (:meth:`verified`): the prompt is prepended, the tokenizer's
    own truncation and special tokens apply, and every other feature is a derivable one (a mask, one-segment type
    ids of 0) or a per-call value.
    """

    SAMPLE = 512  # texts compared with the encoder's own tokenize before it is trusted

    def __init__(
        self, backend: Any, prompt: str, zero_keys: list[str], shared: dict[str, Any], special_tokens: bool = True
    ) -> None:
        self.backend, self.prompt, self.zero_keys, self.shared = backend, prompt, zero_keys, shared
        self.special_tokens = special_tokens  # a reranker's store keeps texts without them (lit_embed.data.pairs)

    @classmethod
    def verified(cls, tokenizer: TextTokenizer, kind: str, texts: Ragged) -> FastTokenIds | None:
        hf = getattr(tokenizer, "tokenizer", None)
        prompt = getattr(tokenizer, "prompt", None)
        if getattr(hf, "backend_tokenizer", None) is None or prompt is None or not len(texts):
            return None
        backend = type(hf.backend_tokenizer).from_str(hf.backend_tokenizer.to_str())  # its own settings
        backend.no_padding()
        direction = getattr(hf, "truncation_side", "right")
        backend.enable_truncation(tokenizer.max_seq_length, strategy="longest_first", direction=direction)
        # Texts spread over all of them, and the longest (in bytes), where truncation shows.
        spread = np.linspace(0, len(texts) - 1, cls.SAMPLE).astype(np.int64)
        longest = np.argsort(texts.lengths, kind="stable")[-cls.SAMPLE // 8 :]
        sample = texts.texts(np.unique(np.concatenate([spread, longest])))
        counts, columns, shared = _unpadded(tokenizer.tokenize(sample, kind))
        others = [key for key in columns if key != "input_ids"]
        if "input_ids" not in columns or any(columns[key].any() for key in others):
            return None
        special_tokens = getattr(tokenizer, "adds_special_tokens", True)
        fast = cls(backend, prompt(kind) or "", others, shared, special_tokens)
        fast_counts, fast_columns, _ = fast(sample)
        if not (
            np.array_equal(fast_counts, counts) and np.array_equal(fast_columns["input_ids"], columns["input_ids"])
        ):
            log.info("The %s token ids are the encoder's tokenize's (its tokenizer differs from its Rust core).", kind)
            return None
        return fast

    def __call__(self, texts: list[str]) -> Columns:
        encodings = self.backend.encode_batch_fast(
            [self.prompt + text for text in texts], add_special_tokens=self.special_tokens
        )
        counts = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        ids = np.fromiter((i for e in encodings for i in e.ids), dtype=np.int64, count=int(counts.sum()))
        columns = {"input_ids": ids} | {key: np.zeros(len(ids), dtype=np.int64) for key in self.zero_keys}
        return counts, columns, self.shared


def _smallest_dtype(vocab_size: int | None, key: str) -> np.dtype:
    """The smallest unsigned integer type that holds every token id (2 bytes for BERT's 30,522 ids)."""
    if vocab_size is None or key != "input_ids":
        return np.dtype(np.int64)
    return next(np.dtype(t) for t in (np.uint8, np.uint16, np.uint32, np.int64) if vocab_size <= np.iinfo(t).max + 1)


def tokenizer_fingerprint(tokenizer: TextTokenizer, kind: str) -> str | None:
    """What decides the token ids of a text of ``kind``; None when they cannot be stored across runs.

    The Hugging Face tokenizer's full description (vocabulary, normalizer, pre-tokenizer, post-processor, without
    the truncation and padding that each call sets), its class and the side it truncates from (padding, added by the
    encoder to a batch, changes no stored id), the prompt, the length limit, and
    the ids it gives a few probe texts (settings outside the tokenizer, such as sentence-transformers'
    lower-casing). An encoder whose features are not token ids (an adapter's rows of an embedding table, which
    change with the table) has none.
    """
    hf = getattr(tokenizer, "tokenizer", None)
    backend = getattr(hf, "backend_tokenizer", None)
    prompt = getattr(tokenizer, "prompt", None)
    if backend is None or prompt is None or getattr(tokenizer, "vocab_size", None) is None:
        return None  # not an encoder of token ids: probing it could change it (an adapter's table)
    probes = [tokenizer.tokenize([text], kind) for text in PROBES]  # one at a time: no padding in what is kept
    if "input_ids" not in probes[0]:
        return None
    description = json.loads(backend.to_str())
    description.pop("truncation", None)
    description.pop("padding", None)
    return content_key(
        type(hf).__name__,
        description,
        getattr(hf, "truncation_side", "right"),
        prompt(kind),
        tokenizer.max_seq_length,
        [{key: value.tolist() for key, value in probe.items() if isinstance(value, Tensor)} for probe in probes],
    )
