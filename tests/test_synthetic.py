"""Question generation with a fake LLM: parsing, retries, counted failures, deterministic ids, crash and resume."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from lit_embed.data.formats import load_dataset, save_llamaindex_json
from lit_embed.errors import DataFormatError, LitEmbedError
from lit_embed.generate import DEFAULT_PROMPT, generate_qa_pairs, parse_questions

CHUNKS = [f"Chunk {i} says that fact number {i} is true." for i in range(5)]
TEMPLATE = "{context_str}|{num_questions_per_chunk}"  # lets the fake LLM read the chunk back


class FakeLLM:
    """Answers like a chatty model, optionally raising on chosen calls; counts every call per chunk."""

    def __init__(self, fail: dict[int, BaseException] | None = None, fail_chunk: str | None = None) -> None:
        self.fail = fail or {}
        self.fail_chunk = fail_chunk
        self.calls: list[str] = []

    def __call__(self, prompt: str) -> str:
        chunk, n = prompt.split("|")
        self.calls.append(chunk)
        if len(self.calls) in self.fail:
            raise self.fail[len(self.calls)]
        if chunk == self.fail_chunk:
            raise ConnectionError("service unavailable")
        lines = "\n".join(f"{i + 1}. What does question {i} ask about '{chunk}'?" for i in range(int(n)))
        return f"Sure! Here are {n} questions:\n\n{lines}\n\nLet me know if you need more."


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("1. What is A?\n2. What is B?", ["What is A?", "What is B?"]),
        ("1) What is A?\n2) What is B?", ["What is A?", "What is B?"]),
        ("(1) What is A?\n(2) What is B?", ["What is A?", "What is B?"]),
        ("Q1: What is A?\nQ2. What is B?", ["What is A?", "What is B?"]),
        ("Question 1: What is A?\nQuestion 2 - What is B?", ["What is A?", "What is B?"]),
        ("- What is A?\n* What is B?\n• What is C?", ["What is A?", "What is B?", "What is C?"]),
        ("**1. What is A?**\n**Question 2:** What is B?", ["What is A?", "What is B?"]),
        ('1. "What is A?"\n2. “What is B?”', ["What is A?", "What is B?"]),
        (
            "Here are two questions based on the context:\n\n1. What is A?\n\n2. What is B?\n\nI hope these help!",
            ["What is A?", "What is B?"],
        ),
        ("Sure! What is A?\nWhat is B?", ["Sure! What is A?", "What is B?"]),  # one line, one question: kept whole
        ("1. What is A?\n   Answer: A is a letter.\n2. What is B?", ["What is A?", "What is B?"]),
        ("1. What is A?\n2. what is a?\n3. What is B?", ["What is A?", "What is B?"]),  # repeats dropped
        # Numbers that are part of the question stay.
        (
            "3.5 million users did what?\n1:1 mappings are what?",
            ["3.5 million users did what?", "1:1 mappings are what?"],
        ),
        ("Q-learning updates what?\n-5 degrees is how cold?", ["Q-learning updates what?", "-5 degrees is how cold?"]),
        # No line ends with "?": the list items are the questions, the preamble is not.
        ("Here are two questions:\n1. Explain A.\n2. Describe B.", ["Explain A.", "Describe B."]),
        ("I cannot write questions about this text.", []),
        ("", []),
    ],
)
def test_parse_questions(answer: str, expected: list[str]) -> None:
    assert parse_questions(answer) == expected


def test_generates_llamaindex_dataset_with_deterministic_ids(tmp_path: Path) -> None:
    llm = FakeLLM()
    data = generate_qa_pairs(CHUNKS, llm, num_questions_per_chunk=2, prompt_template=TEMPLATE)
    assert len(llm.calls) == 5
    assert list(data.corpus.values()) == CHUNKS
    assert len(data.queries) == 10
    for qid, question in data.queries.items():
        (doc_id,) = data.relevant_docs[qid]
        assert f"'{data.corpus[doc_id]}'" in question and "Sure" not in question
    again = generate_qa_pairs(CHUNKS, FakeLLM(), num_questions_per_chunk=2, prompt_template=TEMPLATE)
    assert again == data  # same chunks, same ids

    save_llamaindex_json(data, tmp_path / "qa.json")
    assert load_dataset(tmp_path / "qa.json") == data


def test_mapping_keys_are_chunk_ids_and_default_prompt_is_filled() -> None:
    prompts = []

    def complete(prompt: str) -> str:
        prompts.append(prompt)
        return "1. Who?\n2. Why?\n3. When?"

    data = generate_qa_pairs({"node-a": "Alpha text.", "node-b": "Beta text."}, complete, num_questions_per_chunk=3)
    assert set(data.corpus) == {"node-a", "node-b"}
    assert sorted(d for docs in data.relevant_docs.values() for d in docs) == ["node-a"] * 3 + ["node-b"] * 3
    assert "Alpha text." in prompts[0] and "3 questions" in prompts[0]
    assert prompts[0] == DEFAULT_PROMPT.format(context_str="Alpha text.", num_questions_per_chunk=3)


def test_equal_texts_are_one_chunk() -> None:
    llm = FakeLLM()
    data = generate_qa_pairs([CHUNKS[0], CHUNKS[1], CHUNKS[0]], llm, prompt_template=TEMPLATE)
    assert len(llm.calls) == 2 and len(data.corpus) == 2


def test_flaky_llm_is_retried() -> None:
    llm = FakeLLM(fail={1: TimeoutError("slow"), 2: ConnectionError("reset")})
    data = generate_qa_pairs(CHUNKS[:2], llm, prompt_template=TEMPLATE, retry_delay=0)
    assert llm.calls == [CHUNKS[0]] * 3 + [CHUNKS[1]]
    assert len(data.queries) == 4


def test_too_few_questions_are_retried_then_kept_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def complete(prompt: str) -> str:
        calls.append(prompt)
        return "Here is a question:\n1. What is this?" if len(calls) != 2 else "Nothing useful."

    with caplog.at_level(logging.INFO, logger="lit_embed.generate"):
        data = generate_qa_pairs(["Some text."], complete, num_questions_per_chunk=3, max_retries=2)
    assert len(calls) == 3  # first try + 2 retries
    assert list(data.queries.values()) == ["What is this?"]
    assert "1 chunks got fewer than 3 questions in 3 tries" in caplog.text


def test_failing_chunk_is_skipped_counted_and_asked_again_next_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    progress = tmp_path / "progress.jsonl"
    llm = FakeLLM(fail_chunk=CHUNKS[1])
    with caplog.at_level(logging.WARNING, logger="lit_embed.generate"):
        data = generate_qa_pairs(CHUNKS, llm, prompt_template=TEMPLATE, progress_path=progress, retry_delay=0)
    assert llm.calls.count(CHUNKS[1]) == 4  # 1 try + 3 retries
    assert len(data.corpus) == 5 and len(data.queries) == 8  # still in the corpus, without questions
    assert "1 chunks skipped: complete() raised on all 4 tries" in caplog.text
    assert "ConnectionError('service unavailable')" in caplog.text
    assert len(progress.read_text().splitlines()) == 4  # the failed chunk is not recorded as done

    llm = FakeLLM()
    data = generate_qa_pairs(CHUNKS, llm, prompt_template=TEMPLATE, progress_path=progress)
    assert llm.calls == [CHUNKS[1]]
    assert len(data.queries) == 10


def test_resume_after_crash_asks_only_unfinished_chunks(tmp_path: Path) -> None:
    progress = tmp_path / "out" / "progress.jsonl"
    llm = FakeLLM(fail={3: KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        generate_qa_pairs(CHUNKS, llm, prompt_template=TEMPLATE, progress_path=progress)
    assert llm.calls == CHUNKS[:3]
    assert [json.loads(line)["questions"][0] for line in progress.read_text().splitlines()] == [
        f"What does question 0 ask about '{chunk}'?" for chunk in CHUNKS[:2]
    ]

    llm = FakeLLM()
    resumed = generate_qa_pairs(CHUNKS, llm, prompt_template=TEMPLATE, progress_path=progress)
    assert llm.calls == CHUNKS[2:]  # chunks 1 and 2 are not sent again
    assert resumed == generate_qa_pairs(CHUNKS, FakeLLM(), prompt_template=TEMPLATE)

    llm = FakeLLM()
    generate_qa_pairs(CHUNKS, llm, prompt_template=TEMPLATE, progress_path=progress)
    assert llm.calls == []  # all done


def test_torn_progress_line_is_repaired(tmp_path: Path) -> None:
    progress = tmp_path / "progress.jsonl"
    generate_qa_pairs(CHUNKS[:2], FakeLLM(), prompt_template=TEMPLATE, progress_path=progress)
    with progress.open("a") as f:
        f.write('{"chunk_id": "abc", "sha2')  # killed mid-write
    llm = FakeLLM()
    data = generate_qa_pairs(CHUNKS[:3], llm, prompt_template=TEMPLATE, progress_path=progress)
    assert llm.calls == [CHUNKS[2]] and len(data.queries) == 6
    assert [json.loads(line) for line in progress.read_text().splitlines()][-1]["questions"]


def test_changed_text_under_same_id_is_asked_again(tmp_path: Path) -> None:
    progress = tmp_path / "progress.jsonl"
    generate_qa_pairs({"a": CHUNKS[0], "b": CHUNKS[1]}, FakeLLM(), prompt_template=TEMPLATE, progress_path=progress)
    llm = FakeLLM()
    data = generate_qa_pairs({"a": CHUNKS[0], "b": CHUNKS[2]}, llm, prompt_template=TEMPLATE, progress_path=progress)
    assert llm.calls == [CHUNKS[2]]
    assert all(CHUNKS[1] not in q for q in data.queries.values())


def test_corrupt_progress_line_names_the_line(tmp_path: Path) -> None:
    progress = tmp_path / "progress.jsonl"
    progress.write_text('{"chunk_id": "a", "sha256": "x", "questions": []}\nnot json\n')
    with pytest.raises(DataFormatError, match=r"progress\.jsonl, line 2: not a progress record"):
        generate_qa_pairs(CHUNKS, FakeLLM(), prompt_template=TEMPLATE, progress_path=progress)


def test_broken_llm_stops_after_five_failed_chunks(tmp_path: Path) -> None:
    calls = []

    def complete(prompt: str) -> str:
        calls.append(prompt)
        raise PermissionError("invalid API key")

    with pytest.raises(LitEmbedError, match=r"5 chunks in a row.*invalid API key.*progress_path=") as err:
        generate_qa_pairs([f"text {i}" for i in range(20)], complete, progress_path=tmp_path / "p.jsonl", retry_delay=0)
    assert len(calls) == 5 * 4
    assert isinstance(err.value.__cause__, PermissionError)


@pytest.mark.parametrize(
    ("chunks", "template", "expected"),
    [
        (["a", "  "], TEMPLATE, r"chunk 1 \(counting from 0\) is empty"),
        ({"id-1": "a", "id-2": ""}, TEMPLATE, r"chunk 'id-2' is empty"),
        ({1: "a"}, TEMPLATE, r"chunk ids must be strings"),
        ("one long text", TEMPLATE, r"chunks is one string"),
        (["a"], "Questions about {text}", r"placeholders \['text'\]; it needs \{context_str\}"),
        (["a"], 'Answer as {"q": ...} about {context_str}', r"placeholders"),
    ],
)
def test_bad_arguments_are_reported_before_any_call(chunks, template: str, expected: str) -> None:
    llm = FakeLLM()
    with pytest.raises(DataFormatError, match=expected):
        generate_qa_pairs(chunks, llm, prompt_template=template)
    assert llm.calls == []


def test_non_string_answer_is_a_clear_type_error() -> None:
    with pytest.raises(TypeError, match=r"llm\.complete\(prompt\)\.text"):
        generate_qa_pairs(["a"], lambda prompt: object())


def test_concurrent_chunks_give_the_same_dataset_and_progress(tmp_path: Path) -> None:
    chunks = [f"Chunk {i} says that fact number {i} is true." for i in range(40)]
    progress = tmp_path / "progress.jsonl"
    llm = FakeLLM()
    data = generate_qa_pairs(chunks, llm, prompt_template=TEMPLATE, progress_path=progress, concurrency=6)
    assert sorted(llm.calls) == sorted(chunks)  # each asked once
    assert data == generate_qa_pairs(chunks, FakeLLM(), prompt_template=TEMPLATE)
    assert len(progress.read_text().splitlines()) == 40
    again = FakeLLM()
    generate_qa_pairs(chunks, again, prompt_template=TEMPLATE, progress_path=progress, concurrency=6)
    assert again.calls == []


def test_a_lit_embed_error_stops_at_once_and_ctrl_c_in_a_thread_reaches_the_caller() -> None:
    def refused(prompt: str) -> str:
        refused.calls += 1
        raise LitEmbedError("HTTP 401: set the API key")

    refused.calls = 0
    with pytest.raises(LitEmbedError, match="set the API key"):
        generate_qa_pairs(CHUNKS, refused, prompt_template=TEMPLATE, retry_delay=0)
    assert refused.calls == 1  # no retry mends it
    with pytest.raises(KeyboardInterrupt):
        generate_qa_pairs(CHUNKS, FakeLLM(fail={2: KeyboardInterrupt()}), prompt_template=TEMPLATE, concurrency=3)


def test_retry_after_is_waited_for() -> None:
    class RateLimited(Exception):
        retry_after = 0.4

    llm = FakeLLM(fail={1: RateLimited("429")})
    started = time.monotonic()
    generate_qa_pairs(CHUNKS[:1], llm, prompt_template=TEMPLATE, retry_delay=0)
    assert time.monotonic() - started >= 0.4 and len(llm.calls) == 2
