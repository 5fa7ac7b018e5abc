"""Training data from documents alone: an LLM writes questions that each chunk of text answers.

Like LlamaIndex's ``generate_qa_embedding_pairs`` (same prompt placeholders, same JSON output via
:func:`lit_embed.data.formats.save_llamaindex_json`), but:

* answers are parsed robustly: numbering, bullets and chatty preambles do not become "questions";
* a failing or short answer is retried, and what could not be recovered is counted and logged, never dropped silently;
* with ``progress_path``, every finished chunk is on disk at once, so a crash or Ctrl-C costs at most the chunks in
  flight and the next call resumes without asking the LLM again;
* several chunks can be asked at once (``concurrency``);
* ids are deterministic: the same chunks give the same chunk and query ids on every run.

Around this core: ``llm`` (an OpenAI-compatible chat client), ``filters`` (weak questions dropped and counted) and
``pipeline`` (``lit-embed-generate``, or ``python -m lit_embed.generate``: a folder of documents to train.json and
val.json).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import random
import re
import string
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from lit_embed.data.schema import QADataset, validate
from lit_embed.errors import DataFormatError, LitEmbedError

log = logging.getLogger(__name__)

# LlamaIndex's placeholder names, so a prompt written for generate_qa_embedding_pairs works here unchanged.
DEFAULT_PROMPT = (
    "Context information is below.\n\n"
    "---------------------\n"
    "{context_str}\n"
    "---------------------\n\n"
    "Given the context information and no prior knowledge, generate {num_questions_per_chunk} questions that the "
    "context answers.\n"
    "You are a Teacher/Professor. Your task is to set up {num_questions_per_chunk} questions for an upcoming "
    "quiz/examination. The questions should be diverse in nature across the document. Restrict the questions to the "
    "context information provided. Write one question per line and nothing else.\n"
)

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "lit_embed.synthetic")
_PLACEHOLDERS = {"context_str", "num_questions_per_chunk"}
# Failures in a row that mean "complete() is broken or the service is down", not "this chunk is odd".
_MAX_CONSECUTIVE_FAILURES = 5

# A list marker at the start of a line: "1." "1)" "(1)" "1:" (not "3.5"), "Q1:" "Q:" "Question 2 -", bullets, "**".
_MARKER = re.compile(
    r"""^(?:
        \*\*
      | [-*+–]\s+ | [•·]
      | \(\d{1,3}\) | \d{1,3}[.):](?!\d)
      | (?:q|question)\s*\d*\s*[.):] | question\s+\d+\s*[-–]
    )\s*""",
    re.IGNORECASE | re.VERBOSE,
)


def generate_qa_pairs(
    chunks: Sequence[str] | Mapping[str, str],
    complete: Callable[[str], str],
    num_questions_per_chunk: int = 2,
    prompt_template: str = DEFAULT_PROMPT,
    max_retries: int = 3,
    progress_path: str | os.PathLike | None = None,
    retry_delay: float = 1.0,
    concurrency: int = 1,
) -> QADataset:
    """Asks ``complete`` for questions about each chunk; returns queries, corpus (the chunks) and which answers which.

    A chunk is asked again (up to ``max_retries`` more times) when ``complete`` raises or fewer than
    ``num_questions_per_chunk`` questions could be parsed. After the last try a short chunk keeps the questions it
    got; a chunk on which every call raised is skipped (and, with ``progress_path``, asked again by the next call).
    Both are counted in the log. After five chunks in a row fail, the last error is raised instead, since every
    further chunk would most likely fail too.

    Args:
        chunks: the texts, or chunk id -> text (e.g. LlamaIndex node ids). Without ids, a chunk's id is the uuid5 of
            its text, and equal texts are one chunk.
        complete: prompt -> the LLM's answer, e.g. ``lambda prompt: llm.complete(prompt).text``, or a
            :class:`lit_embed.generate.llm.ChatCompletions`. An exception it raises counts as a failed try, except a
            :class:`LitEmbedError` (something no retry mends, such as a refused API key), which stops the run, as
            KeyboardInterrupt does. An exception with a ``retry_after`` attribute (seconds) waits at least that long.
        num_questions_per_chunk: questions to ask for (and keep at most) per chunk.
        prompt_template: ``str.format`` template with ``{context_str}`` and optionally ``{num_questions_per_chunk}``
            (LlamaIndex's names); other braces must be doubled.
        max_retries: further tries per chunk after the first.
        progress_path: JSONL file with one line per finished chunk, written as each finishes. If it exists, chunks
            it holds (same id, same text) are not asked again, even if ``num_questions_per_chunk`` has changed.
        retry_delay: seconds to wait before retrying after an exception, doubled on each further retry, times a
            random factor between 0.5 and 1.5 (so that many clients refused at once do not all come back at once).
        concurrency: chunks asked at once, each from a thread of its own; ``complete`` must allow that. Progress
            is still written by one thread, a line per finished chunk, so a crash costs at most the chunks in
            flight. The dataset does not depend on the order in which the answers come.

    Returns:
        The dataset; each query has its chunk as its one relevant document, and every chunk is in the corpus.
        Query ids are the uuid5 of ``"{chunk id}/{question index}"``.
    """
    if num_questions_per_chunk < 1 or max_retries < 0 or concurrency < 1:
        raise ValueError(
            "need num_questions_per_chunk >= 1, max_retries >= 0 and concurrency >= 1, got "
            f"{num_questions_per_chunk}, {max_retries}, {concurrency}"
        )
    check_template(prompt_template)
    corpus = _chunk_ids(chunks)
    progress = Path(progress_path) if progress_path is not None else None
    if progress is not None:
        progress.parent.mkdir(parents=True, exist_ok=True)
    questions = _read_progress(progress, corpus) if progress is not None and progress.exists() else {}
    resumed = len(questions)
    short, failed, consecutive_failures = [], [], 0
    last_error: Exception | None = None
    todo = [(chunk_id, text) for chunk_id, text in corpus.items() if chunk_id not in questions]
    if resumed:
        log.info(
            "%s: %d of %d chunks were asked before; asking the other %d.", progress, resumed, len(corpus), len(todo)
        )

    def ask(chunk_id: str, text: str, stop: threading.Event) -> tuple[list[str] | None, Exception | None]:
        prompt = prompt_template.format(context_str=text, num_questions_per_chunk=num_questions_per_chunk)
        return _ask(complete, prompt, num_questions_per_chunk, max_retries, retry_delay, chunk_id, stop)

    with open(progress, "a", encoding="utf-8") if progress is not None else contextlib.nullcontext() as sink:
        for finished, (chunk_id, (got, error)) in enumerate(_answers(todo, ask, concurrency), start=1):
            if len(todo) >= 20 and finished % (len(todo) // 10) == 0 and finished < len(todo):
                log.info("asked %d of %d chunks (%d failed so far)", finished, len(todo), len(failed))
            text = corpus[chunk_id]
            if got is None:
                failed.append(chunk_id)
                last_error, consecutive_failures = error, consecutive_failures + 1
                if consecutive_failures >= _MAX_CONSECUTIVE_FAILURES:
                    raise LitEmbedError(
                        f"complete() failed on {consecutive_failures} chunks in a row, {max_retries + 1} tries each "
                        f"(last error: {error!r}). Fix the LLM call, then call again"
                        + (f" with progress_path={str(progress)!r} to resume." if progress else ".")
                    ) from error
                continue
            consecutive_failures = 0
            if len(got) < num_questions_per_chunk:
                short.append(chunk_id)
            questions[chunk_id] = got
            if sink is not None:
                _append(sink, {"chunk_id": chunk_id, "sha256": _sha256(text), "questions": got})
    _log_summary(questions, resumed, short, failed, last_error, num_questions_per_chunk, max_retries, progress)
    dataset = QADataset(queries={}, corpus=corpus, relevant_docs={})
    for chunk_id in corpus:
        for index, question in enumerate(questions.get(chunk_id, [])):
            query_id = str(uuid.uuid5(_NAMESPACE, f"{chunk_id}/{index}"))
            dataset.queries[query_id] = question
            dataset.relevant_docs[query_id] = [chunk_id]
    return validate(dataset, source="generate_qa_pairs")


def parse_questions(answer: str) -> list[str]:
    """The questions in an LLM's answer, in order, without numbering, bullets, preamble or repeats.

    Each line is stripped of list markers ("1.", "1)", "Q1:", "- ", "* ", "•", markdown bold) and surrounding quotes.
    The questions are the lines that then end with "?": a preamble or outro ("Here are two questions:", "Sure!")
    does not. Only if no line ends with "?" (a model writing "Explain ..." items) are the lines that carried a list
    marker taken instead.
    """
    lines = []
    for raw in answer.split("\n"):
        line, marked = raw.strip(), False
        while match := _MARKER.match(line):
            line, marked = line[match.end() :], True
        line = line.removesuffix("**").strip()
        if len(line) > 1 and line[0] in '"“' and line[-1] in '"”':
            line = line[1:-1].strip()
        if line:
            lines.append((line, marked))
    questions = [line for line, _ in lines if line.endswith("?")] or [line for line, marked in lines if marked]
    unique: dict[str, str] = {}
    for question in questions:
        unique.setdefault(question.casefold(), question)
    return list(unique.values())


def _answers(
    todo: list[tuple[str, str]],
    ask: Callable[[str, str, threading.Event], tuple[list[str] | None, Exception | None]],
    concurrency: int,
) -> Iterator[tuple[str, tuple[list[str] | None, Exception | None]]]:
    """``(chunk id, ask's result)`` of every chunk of ``todo``, as each finishes, from ``concurrency`` threads.

    An exception that ``ask`` lets through (KeyboardInterrupt, a LitEmbedError) is raised here, in the caller's
    thread. When the caller stops early, the threads take no further chunk and give up their retries.
    """
    stop = threading.Event()
    if concurrency == 1:  # in the caller's thread, where Ctrl-C arrives inside complete() itself
        for chunk_id, text in todo:
            yield chunk_id, ask(chunk_id, text, stop)
        return
    tasks: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
    done: queue.SimpleQueue[tuple[str, Any, BaseException | None]] = queue.SimpleQueue()
    for task in todo:
        tasks.put(task)

    def work() -> None:
        while not stop.is_set():
            try:
                chunk_id, text = tasks.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((chunk_id, ask(chunk_id, text, stop), None))
            except BaseException as err:  # handed to the caller's thread, which raises it
                done.put((chunk_id, None, err))

    # Daemon threads: Ctrl-C or an error ends the process at once, without waiting for the answers in flight,
    # which are lost anyway (only the caller's thread writes progress).
    for number in range(min(concurrency, len(todo))):
        threading.Thread(target=work, name=f"lit_embed-generate-{number}", daemon=True).start()
    try:
        for _ in todo:
            try:
                chunk_id, result, error = done.get()
            except KeyboardInterrupt:
                stop.set()
                # Answers that arrived before Ctrl-C are the caller's to save: only those in flight are lost.
                while not done.empty():
                    chunk_id, result, error = done.get_nowait()
                    if error is None:
                        yield chunk_id, result
                raise
            if error is not None:
                raise error
            yield chunk_id, result
    finally:
        stop.set()


def _ask(
    complete: Callable[[str], str],
    prompt: str,
    wanted: int,
    max_retries: int,
    retry_delay: float,
    chunk_id: str,
    stop: threading.Event,
) -> tuple[list[str] | None, Exception | None]:
    """The most questions any try gave (None if every try raised), and the last exception."""
    best: list[str] | None = None
    error: Exception | None = None
    for attempt in range(max_retries + 1):
        if stop.is_set():
            break
        try:
            answer = complete(prompt)
        except LitEmbedError:
            raise  # no retry mends it: a refused key, a wrong URL
        # Network errors, timeouts and rate limits are what retries are for; what remains is counted and logged.
        except Exception as err:
            error = err
            log.info("chunk %s, try %d of %d: complete() raised %r", chunk_id, attempt + 1, max_retries + 1, err)
            if attempt < max_retries:
                delay = retry_delay * 2**attempt * random.uniform(0.5, 1.5)
                stop.wait(max(delay, getattr(err, "retry_after", None) or 0.0))
            continue
        if not isinstance(answer, str):
            raise TypeError(
                f"complete() must return the answer as str, got {type(answer).__name__}; "
                "for a LlamaIndex LLM pass lambda prompt: llm.complete(prompt).text"
            )
        got = parse_questions(answer)[:wanted]
        if best is None or len(got) > len(best):
            best = got
        if len(best) == wanted:
            break
        log.info(
            "chunk %s, try %d of %d: parsed %d of %d questions",
            chunk_id,
            attempt + 1,
            max_retries + 1,
            len(got),
            wanted,
        )
    return best, error


def check_template(template: str, source: str = "prompt_template") -> None:
    """Refuses a prompt without ``{context_str}``, or with other placeholders; ``source`` names it in the message."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise DataFormatError(f"{source}: {err}. Double any literal brace ({{{{ or }}}}).") from None
    if "context_str" not in fields or not fields <= _PLACEHOLDERS:
        raise DataFormatError(
            f"{source} has placeholders {sorted(fields)}; it needs {{context_str}} and may use "
            "{num_questions_per_chunk}, nothing else. Double any literal brace ({{ or }})."
        )


def _chunk_ids(chunks: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """Chunk id -> text; raises on anything that could not become a document."""
    if isinstance(chunks, str):
        raise DataFormatError("chunks is one string; pass a list of chunk texts (or a dict of id -> text).")
    pairs = chunks.items() if isinstance(chunks, Mapping) else enumerate(chunks)
    corpus = {}
    for key, text in pairs:
        where = f"chunk {key!r}" if isinstance(chunks, Mapping) else f"chunk {key} (counting from 0)"
        if isinstance(chunks, Mapping) and not isinstance(key, str):
            raise DataFormatError(f"{where}: chunk ids must be strings, got {type(key).__name__}. Use str ids.")
        if not isinstance(text, str) or not text.strip():
            raise DataFormatError(f"{where} is empty or not text. Remove it or fill in the text.")
        corpus[key if isinstance(chunks, Mapping) else str(uuid.uuid5(_NAMESPACE, text))] = text
    return corpus


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_progress(path: Path, corpus: dict[str, str]) -> dict[str, list[str]]:
    """Questions of the chunks the progress file holds with their current text; repairs a torn last line."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        # A crash mid-write leaves part of a line; cut it so the next record starts on a line of its own.
        log.warning("%s: dropping an unfinished last line (an interrupted write); its chunk is asked again.", path)
        with open(path, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
    records: dict[str, tuple[str, list[str]]] = {}
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines() breaks at.
    for lineno, line in enumerate(data[:end].decode("utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            chunk_id, sha256, got = record["chunk_id"], record["sha256"], record["questions"]
        except (json.JSONDecodeError, KeyError, TypeError):
            chunk_id = got = None
        if not isinstance(chunk_id, str) or not isinstance(got, list) or not all(isinstance(q, str) for q in got):
            raise DataFormatError(
                f"{path}, line {lineno}: not a progress record ({{'chunk_id', 'sha256', 'questions'}}). Delete the "
                "line (its chunk is asked again) or pass another progress_path."
            )
        records[chunk_id] = (sha256, got)  # a later line for the same chunk (its text changed) wins
    done = {cid: got for cid, (sha256, got) in records.items() if cid in corpus and sha256 == _sha256(corpus[cid])}
    changed = sum(cid in corpus and cid not in done for cid in records)
    if changed:
        log.warning("%s: %d chunks have new text since they were asked; asking again.", path, changed)
    if len(records) > len(done) + changed:
        log.info(
            "%s: %d records are of chunks not passed this time; ignored.", path, len(records) - len(done) - changed
        )
    return done


def _append(sink: IO[str], record: dict) -> None:
    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
    sink.flush()
    os.fsync(sink.fileno())  # on disk before the next (paid) call, so a crash cannot lose a finished chunk


def _log_summary(
    questions: dict[str, list[str]],
    resumed: int,
    short: list[str],
    failed: list[str],
    last_error: Exception | None,
    wanted: int,
    max_retries: int,
    progress: Path | None,
) -> None:
    log.info(
        "generate_qa_pairs: %d questions for %d chunks (%d asked now, %d read from %s).",
        sum(map(len, questions.values())),
        len(questions),
        len(questions) - resumed,
        resumed,
        progress,
    )
    if short:
        log.warning(
            "%d chunks got fewer than %d questions in %d tries and keep what was parsed (first: %s).",
            len(short),
            wanted,
            max_retries + 1,
            short[0],
        )
    if failed:
        log.warning(
            "%d chunks skipped: complete() raised on all %d tries (first: %s; last error: %r). %s",
            len(failed),
            max_retries + 1,
            failed[0],
            last_error,
            "Call again with the same progress_path to ask only them."
            if progress
            else "Pass progress_path and call again to keep the rest.",
        )
