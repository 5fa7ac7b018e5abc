"""lit-embed-generate against a real HTTP server on 127.0.0.1 that speaks OpenAI's chat-completions protocol
(tests/fake_openai.py): a folder of documents in, train.json / val.json out, resumable, with its failures named."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI
from helpers import REPO, tiny_run_overrides

from lit_embed.data.formats import load_dataset
from lit_embed.errors import LitEmbedError
from lit_embed.generate.filters import COPIED, ROUND_TRIP, SEVERAL_CHUNKS, TOO_SHORT, round_trip
from lit_embed.generate.llm import ChatCompletions, chat_completions_url
from lit_embed.generate.pipeline import generate_from_documents, main, split_by_document

TAGS = ["aurora", "basalt", "cobalt", "dolmen", "ember", "fjord"]
SYLLABLES = ["ka", "lo", "mi", "nu", "pe", "ri", "so", "tu"]
FAST = ["--chunk-size", "48", "--chunk-overlap", "8"]  # a few chunks a document, from short files


def made_up_word(number: int) -> str:
    """A word no other sentence has, so that each chunk gets questions of its own."""
    return "".join(SYLLABLES[(number // 8**i) % 8] for i in range(3))


def document(tag: str, sentences: int = 9, marker: str = "") -> str:
    """Markdown whose every sentence names the document's tag (so a chunk shows its document) and words of its own."""
    base = TAGS.index(tag) * 100 if tag in TAGS else 700
    lines = [f"The {tag} {made_up_word(base + i)} rests beside the {made_up_word(base + 50 + i)} shelf.{marker}"
             for i in range(sentences)]  # fmt: skip
    return f"# The {tag} notes\n\n" + "\n\n".join(" ".join(lines[i : i + 3]) for i in range(0, len(lines), 3))


def write_docs(folder: Path, tags: list[str] = TAGS, **markers: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for tag in tags:
        (folder / f"{tag}.md").write_text(document(tag, marker=markers.get(tag, "")), encoding="utf-8")
    return folder


def tags_in(dataset) -> set[str]:
    return {tag for text in dataset.corpus.values() for tag in TAGS if tag in text}


def run_cli(docs: Path, out: Path, url: str, *extra: str) -> None:
    main([str(docs), str(out), "--llm", url, "--model", "fake-model", *FAST, *extra])


@pytest.fixture()
def server():
    with FakeOpenAI() as fake:
        yield fake


def test_a_folder_becomes_train_and_val_files_split_by_document(
    tmp_path: Path, server: FakeOpenAI, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = write_docs(tmp_path / "docs", TAGS[:5])
    (docs / "page.html").write_text(f"<html><body><p>{document('fjord')}</p><script>x()</script></body></html>")
    (docs / "broken.txt").write_bytes(b"\xff\xfe\x00junk" * 50)
    monkeypatch.setenv("MY_LLM_KEY", "secret-from-env")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        run_cli(docs, out, server.url, "--api-key-env", "MY_LLM_KEY", "--concurrency", "3")

    train, val = load_dataset(out / "train.json"), load_dataset(out / "val.json")
    assert train.queries and val.queries
    assert not tags_in(train) & tags_in(val), "a document's chunks on both sides"
    assert tags_in(train) | tags_in(val) == set(TAGS)
    for query_id, (chunk_id,) in train.relevant_docs.items():
        assert "Sure" not in train.queries[query_id] and train.queries[query_id].endswith("?")
        assert chunk_id in train.corpus
    assert {r["path"] for r in server.requests} == {"/v1/chat/completions"}
    assert {r["authorization"] for r in server.requests} == {"Bearer secret-from-env"}
    assert {r["model"] for r in server.requests} == {"fake-model"}
    assert len(server.requests) == len(train.corpus) + len(val.corpus)  # each chunk asked once
    log_text = (out / "generate.log").read_text(encoding="utf-8")
    assert "Skipped" in log_text and "broken.txt: binary, not text" in log_text
    assert "1 files could not be read and were skipped: broken.txt" in caplog.text  # the console summary
    assert f"python train.py data=qa_json data.train_path={out}/train.json data.val_path={out}/val.json" in caplog.text
    assert "secret-from-env" not in log_text + (out / "documents.json").read_text()


def test_the_same_documents_give_the_same_ids(tmp_path: Path, server: FakeOpenAI) -> None:
    docs = write_docs(tmp_path / "docs")
    run_cli(docs, tmp_path / "one", server.url)
    run_cli(docs, tmp_path / "two", server.url, "--concurrency", "4")  # answers in another order
    for name in ("train.json", "val.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_a_rerun_asks_nothing_again_and_a_changed_document_set_is_noticed(
    tmp_path: Path, server: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    docs, out = write_docs(tmp_path / "docs"), tmp_path / "out"
    run_cli(docs, out, server.url)
    first = len(server.requests)
    run_cli(docs, out, server.url)
    assert len(server.requests) == first

    (docs / "basalt.md").unlink()
    (docs / "aurora.md").write_text(document("aurora") + " A new closing sentence.", encoding="utf-8")
    (docs / "zircon.md").write_text(document("zircon"), encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        run_cli(docs, out, server.url)
    assert "1 added (zircon.md), 1 changed (aurora.md), 1 removed (basalt.md)" in caplog.text
    asked_before, asked_now = set(server.asked()[:first]), server.asked()[first:]
    assert any("A new closing sentence" in chunk for chunk in asked_now)
    assert any("zircon" in chunk for chunk in asked_now)
    assert all("zircon" in chunk or "aurora" in chunk for chunk in asked_now)
    assert not asked_before & set(asked_now)  # unchanged chunks, of aurora.md too, keep their questions
    assert "basalt" not in tags_in(load_dataset(out / "train.json")) | tags_in(load_dataset(out / "val.json"))

    before = len(server.requests)
    run_cli(docs, out, server.url, "--restart")
    chunks = len(load_dataset(out / "train.json").corpus) + len(load_dataset(out / "val.json").corpus)
    assert len(server.requests) - before == chunks  # every chunk asked again


def test_a_run_killed_mid_way_goes_on_without_asking_a_finished_chunk_again(tmp_path: Path) -> None:
    docs, out = write_docs(tmp_path / "docs"), tmp_path / "out"
    progress = out / "progress.jsonl"
    with FakeOpenAI(delay=0.3) as slow:
        command = [sys.executable, "-m", "lit_embed.generate", str(docs), str(out), "--llm", slow.url]
        command += ["--model", "m", "--concurrency", "1", *FAST]
        with open(tmp_path / "console.txt", "w") as console:
            run = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=console)
            deadline = time.monotonic() + 60
            while not (progress.is_file() and len(progress.read_text().splitlines()) >= 3):
                assert run.poll() is None and time.monotonic() < deadline, (tmp_path / "console.txt").read_text()
                time.sleep(0.05)
            run.send_signal(signal.SIGKILL)
            run.wait()
    finished = {json.loads(line)["chunk_id"] for line in progress.read_text().splitlines()}

    with FakeOpenAI() as fast:
        run_cli(docs, out, fast.url)
    text_to_id = {
        text: key for split in ("train", "val") for key, text in load_dataset(out / f"{split}.json").corpus.items()
    }
    asked_again = {text_to_id[chunk] for chunk in fast.asked()}
    assert asked_again and not asked_again & finished
    assert asked_again | finished == set(text_to_id.values())


def test_ctrl_c_stops_at_once_with_the_finished_chunks_saved(tmp_path: Path) -> None:
    docs = write_docs(tmp_path / "docs", TAGS[:3])
    write_docs(docs, TAGS[3:], dolmen=" HANG", ember=" HANG", fjord=" HANG")
    out = tmp_path / "out"
    with FakeOpenAI({"HANG": ["slow"] * 10}, slow_seconds=30) as fake:
        command = [sys.executable, "-m", "lit_embed.generate", str(docs), str(out), "--llm", fake.url, "--model", "m"]
        run = subprocess.Popen(
            [*command, "--concurrency", "4", *FAST],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while sum(r["behaviour"] == "slow" for r in fake.requests) < 4:  # every thread waits on a hanging answer
            assert run.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        run.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        _, stderr = run.communicate(timeout=20)
    assert time.monotonic() - stopped < 5  # not the 30 s the answers in flight would take
    assert run.returncode == 130 and "Traceback" not in stderr
    assert "Stopped. Every finished chunk is saved" in stderr
    finished = [json.loads(line)["chunk_id"] for line in (out / "progress.jsonl").read_text().splitlines()]
    assert len(finished) == len([r for r in fake.requests if r["behaviour"] == "ok"])


def test_slow_rate_limited_failing_and_malformed_answers_are_retried(tmp_path: Path) -> None:
    behaviours = {
        "SLOW": ["slow"],
        "RATE": ["429"],
        "FAIL": ["500", "500"],
        "BAD": ["malformed"],
        "NONE": ["no_choices"],
    }
    docs = tmp_path / "docs"
    docs.mkdir()
    for marker in behaviours:
        (docs / f"{marker.lower()}.md").write_text(f"The {marker} {made_up_word(len(marker))} text stays short.")
    (docs / "fine.md").write_text("The fine paragraph needs no retry at all.")
    with FakeOpenAI(behaviours, slow_seconds=1.5, retry_after=1.0) as fake:
        client = ChatCompletions(fake.url, "m", timeout=0.5)
        result = generate_from_documents(docs, tmp_path / "out", client, retry_delay=0.0, concurrency=3)
    assert result.chunks_without_questions == 0 and result.generated == 12
    tries = {marker: sum(marker in r["chunk"] for r in fake.requests) for marker in behaviours}
    assert tries == {"SLOW": 2, "RATE": 2, "FAIL": 3, "BAD": 2, "NONE": 2}
    rate = [r["time"] for r in fake.requests if "RATE" in r["chunk"]]
    assert rate[1] - rate[0] >= 0.9  # Retry-After: 1
    log_text = (tmp_path / "out" / "generate.log").read_text()
    for expected in ("no answer within 0.5 s", "HTTP 429", "HTTP 500", "malformed answer"):
        assert expected in log_text


def test_concurrency_is_bounded_and_requests_are_spaced(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for number in range(8):
        (docs / f"{number}.md").write_text(f"Document {made_up_word(number)} says {made_up_word(number + 9)}.")
    with FakeOpenAI(delay=0.3) as fake:
        generate_from_documents(docs, tmp_path / "a", ChatCompletions(fake.url, "m"), concurrency=3)
        assert max(r["in_flight"] for r in fake.requests) == 3
        spaced = ChatCompletions(fake.url, "m", requests_per_minute=600)  # one start every 0.1 s
        generate_from_documents(docs, tmp_path / "b", spaced, concurrency=8)
    starts = sorted(r["time"] for r in fake.requests[8:])
    assert len(starts) == 8 and min(b - a for a, b in zip(starts, starts[1:], strict=False)) >= 0.08


def test_weak_questions_are_dropped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    docs = write_docs(tmp_path / "docs", TAGS, aurora=" COPY", basalt=" SHORT", cobalt=" SAME", dolmen=" SAME")
    behaviours = {"COPY": ["copy"] * 50, "SHORT": ["short"] * 50, "SAME": ["same"] * 50}
    with FakeOpenAI(behaviours) as fake, caplog.at_level(logging.INFO):
        result = generate_from_documents(docs, tmp_path / "out", ChatCompletions(fake.url, "m"), chunk_size=48)
    texts = [*result.train.corpus.values(), *(result.val.corpus.values() if result.val else [])]
    marked = Counter(marker for text in texts for marker in ("COPY", "SHORT", "SAME") if marker in text)
    expected = {TOO_SHORT: 2 * marked["SHORT"], COPIED: 2 * marked["COPY"], SEVERAL_CHUNKS: 2 * marked["SAME"]}
    assert result.dropped == expected and result.generated == 2 * result.chunks
    kept = [*result.train.queries.values(), *(result.val.queries.values() if result.val else [])]
    assert len(kept) == result.generated - sum(expected.values())
    assert not {"Why?", "How so?", "What is this document about?"} & set(kept)
    assert f"{2 * result.chunks} questions generated; {sum(expected.values())} dropped" in caplog.text
    assert "too short" in (tmp_path / "out" / "generate.log").read_text()


def test_too_few_documents_for_a_split_write_train_json_only(tmp_path: Path, server: FakeOpenAI, caplog) -> None:
    docs = write_docs(tmp_path / "docs", TAGS[:1])
    with caplog.at_level(logging.INFO):
        run_cli(docs, tmp_path / "out", server.url)
    assert (tmp_path / "out" / "train.json").is_file() and not (tmp_path / "out" / "val.json").exists()
    assert "a split needs two documents, and there is one" in caplog.text
    assert "data.val_path" not in caplog.text


def test_the_split_takes_whole_documents_and_keeps_one_for_training() -> None:
    from lit_embed.data.schema import QADataset

    document_of = {f"c{i}": f"doc{i // 3}" for i in range(30)}  # 10 documents of 3 chunks
    corpus = {c: f"text {c}" for c in document_of}
    data = QADataset({f"q{c}": f"about {c}" for c in corpus}, corpus, {f"q{c}": [c] for c in corpus})
    train, val = split_by_document(data, document_of, 0.2, seed=3)
    assert len(val.corpus) == 6 and len(train.corpus) == 24
    assert not {document_of[c] for c in train.corpus} & {document_of[c] for c in val.corpus}
    assert split_by_document(data, document_of, 0.2, seed=3) == (train, val)
    _, other = split_by_document(data, document_of, 0.2, seed=4)
    assert other.corpus != val.corpus
    two = {c: d for c, d in document_of.items() if d in ("doc0", "doc1")}
    data_two = QADataset({f"q{c}": "?" for c in two}, {c: corpus[c] for c in two}, {f"q{c}": [c] for c in two})
    train, val = split_by_document(data_two, two, 0.2)
    assert len(train.corpus) == len(val.corpus) == 3  # at least one document each way


class WordVectors:
    """A stand-in base model: a bag of hashed words, so the round trip's ranking is known in advance."""

    embedding_dim = 256

    def __init__(self) -> None:
        import torch

        self.device = torch.device("cpu")

    def encode(self, texts: list[str], kind: str, batch_size: int = 64):
        import torch

        vectors = torch.zeros(len(texts), self.embedding_dim)
        for row, text in enumerate(texts):
            for word in text.lower().replace("?", " ").replace(".", " ").split():
                vectors[row, sum(map(ord, word)) * 31 % self.embedding_dim] += 1.0
        return vectors


def test_round_trip_keeps_questions_whose_chunk_ranks_in_the_top_k() -> None:
    from lit_embed.data.schema import QADataset

    corpus = {"a": "the kettle boils water", "b": "the bicycle chain needs oil", "c": "tomatoes want full sun"}
    queries = {"q1": "why does the kettle boil water", "q2": "when does the bicycle chain need oil", "q3": "what then"}
    data = QADataset(queries, corpus, {"q1": ["a"], "q2": ["b"], "q3": ["c"]})
    kept, dropped = round_trip(data, WordVectors(), top_k=1)
    assert set(kept.queries) == {"q1", "q2"} and dropped == {ROUND_TRIP: 1}
    assert kept.corpus == corpus  # every chunk stays, a distractor if it lost its questions


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://localhost:8000", "http://localhost:8000/v1/chat/completions"),
        ("http://localhost:8000/v1", "http://localhost:8000/v1/chat/completions"),
        ("http://localhost:8000/v1/", "http://localhost:8000/v1/chat/completions"),
        ("https://api.example.com/openai/v1", "https://api.example.com/openai/v1/chat/completions"),
        ("http://h:1/v1/chat/completions", "http://h:1/v1/chat/completions"),
    ],
)
def test_base_urls_with_or_without_v1(url: str, expected: str) -> None:
    assert chat_completions_url(url) == expected


def test_thinking_is_not_a_question(tmp_path: Path, server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    original = server._answer
    monkeypatch.setattr(server, "_answer", lambda *a: "<think>\nWhat should I ask?\n</think>\n" + original(*a))
    answer = ChatCompletions(server.url, "m")("Context information is below.\n\n---------------------\nx y\n")
    assert "What should I ask?" not in answer and "1. What does the passage explain" in answer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing docs", "no-such-folder: no such file or folder"),
        ("no documents", "no document to ask about (2 files, none readable"),
        ("unreachable", "cannot connect"),
        ("bad prompt", "prompt.txt has placeholders ['chunk']; it needs {context_str}"),
        ("refused key", "refused the request: HTTP 401"),
        ("user's folder", "holds files that lit-embed-generate did not make (notes.txt)"),
        ("not a url", "not an http(s) URL"),
    ],
)
def test_bad_input_is_one_message_and_exit_2(
    case: str, message: str, tmp_path: Path, server: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    docs, out, url = write_docs(tmp_path / "docs", TAGS[:2]), tmp_path / "out", server.url
    extra: list[str] = []
    if case == "missing docs":
        docs = tmp_path / "no-such-folder"
    elif case == "no documents":
        docs = tmp_path / "junk"
        docs.mkdir()
        (docs / "a.txt").write_bytes(b"\x00\x01")
        (docs / "b.jpg").write_bytes(b"\xff\xd8")
    elif case == "unreachable":
        url = f"http://127.0.0.1:{free_port()}/v1"
    elif case == "bad prompt":
        (tmp_path / "prompt.txt").write_text("Ask about {chunk}")
        extra = ["--prompt-file", str(tmp_path / "prompt.txt")]
    elif case == "refused key":
        server.behaviours = {"": ["401"] * 100}
    elif case == "user's folder":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "not a url":
        url = "localhost:8000"
    with pytest.raises(SystemExit) as stopped:
        run_cli(docs, out, url, *extra)
    assert stopped.value.code == 2
    assert message in caplog.text
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert not (out / "train.json").exists()
    if case == "user's folder":
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_command_line_error_has_no_traceback(tmp_path: Path) -> None:
    docs = write_docs(tmp_path / "docs", TAGS[:2])
    url = f"http://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "lit_embed.generate", str(docs), str(tmp_path / "out"), "--llm", url]
    done = subprocess.run(
        [*command, "--model", "m"], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert done.returncode == 2, done.stderr
    assert "cannot connect" in done.stderr and "Start the server" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_a_second_run_into_the_same_folder_is_refused(tmp_path: Path, server: FakeOpenAI) -> None:
    import fcntl

    docs, out = write_docs(tmp_path / "docs", TAGS[:2]), tmp_path / "out"
    run_cli(docs, out, server.url)
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(LitEmbedError, match=r"in use by another lit-embed-generate"):
            generate_from_documents(docs, out, ChatCompletions(server.url, "m"))


@pytest.mark.slow
def test_generated_files_train_and_round_trip_with_minilm(tmp_path: Path, server: FakeOpenAI) -> None:
    docs, out = write_docs(tmp_path / "docs"), tmp_path / "out"
    run_cli(docs, out, server.url, "--round-trip-top-k", "3")
    assert ROUND_TRIP in (out / "generate.log").read_text()
    overrides = tiny_run_overrides(out / "train.json", out / "val.json", tmp_path / "run", **{"trainer.max_steps": 2})
    done = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *overrides], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "run" / "model" / "modules.json").is_file()
