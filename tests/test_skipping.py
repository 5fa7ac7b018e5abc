"""Records wrong on their own are skipped with one warning while they are few; too many, or strict, is an error.

Files are written the way other people's pipelines write them: LlamaIndex's ``generate_qa_embedding_pairs`` JSON
(uuid query ids, node-id corpus keys, two questions per chunk), miners' JSONL with hard negatives, CSV exports.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers import REPO, compose_train, tiny_run_overrides, write_toy_data

from lit_embed.data.formats import load_dataset, training_rows
from lit_embed.data.schema import SkipPolicy, training_examples
from lit_embed.errors import DataFormatError, InvalidValueError
from lit_embed.train import run
from lit_embed.training.report import skipped_note


def llamaindex_file(path: Path, chunks: int, empty: tuple[int, ...] = (), questions_per_chunk: int = 2) -> Path:
    """A file as ``generate_qa_embedding_pairs(...).save_json`` writes it; chunks in ``empty`` parsed to ''."""
    rng = uuid.UUID(int=0)
    queries, corpus, relevant = {}, {}, {}
    for c in range(chunks):
        node = str(uuid.uuid5(rng, f"node {c}"))
        corpus[node] = "" if c in empty else f"Section {c}. The widget {c} is calibrated every {c + 1} days."
        for k in range(questions_per_chunk):
            qid = str(uuid.uuid5(rng, f"question {c} {k}"))
            queries[qid] = f"How often is widget {c} calibrated (variant {k})?"
            relevant[qid] = [node]
    path.write_text(json.dumps({"queries": queries, "corpus": corpus, "relevant_docs": relevant, "mode": "text"}))
    return path


def test_a_llamaindex_file_with_one_empty_chunk_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = llamaindex_file(tmp_path / "qa.json", chunks=300, empty=(17,))
    with caplog.at_level(logging.WARNING):
        data = load_dataset(path)
    # The empty chunk and the two questions it answered are left out; everything else is kept.
    assert len(data.corpus) == 299 and len(data.queries) == 598 and len(data.relevant_docs) == 598
    assert all(text.strip() for text in data.corpus.values())
    report = data.skipped.as_dict()
    assert report["records"] == 900 and report["wrong_records"] == 3 and report["problems"] == 3
    assert report["empty_text"]["count"] == 1 and report["unanswered"]["count"] == 2
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"{path}: skipped 3 problems in 3 of 900 records that are wrong on their own")
    assert "empty texts: 1 (document '" in warning and "queries without a relevant document: 2 ('" in warning


def counts(warning: str) -> tuple[int, int, int]:
    """(problems, wrong records, records) as the warning says them."""
    found = re.search(r"skipped (\d+) problems? in (\d+) of (\d+) records that are wrong on their own", warning)
    assert found, warning
    return tuple(int(n) for n in found.groups())


def test_problems_and_records_are_counted_apart(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A query naming six documents the corpus lacks: six problems in one of three records (not "6 of 3 records")."""
    path = tmp_path / "qa.json"
    relevant = {"q1": ["d1", *(f"gone-{i}" for i in range(6))]}
    corpus = {"d1": "The widget is calibrated every 3 days.", "d2": "The gauge is never calibrated."}
    path.write_text(
        json.dumps(
            {"queries": {"q1": "How often is the widget calibrated?"}, "corpus": corpus, "relevant_docs": relevant}
        )
    )
    with caplog.at_level(logging.WARNING):
        data = load_dataset(path, policy=SkipPolicy(max_skipped=1))  # one wrong record allowed
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    problems, wrong, records = counts(warning)
    assert (problems, wrong, records) == (6, 1, 3) and wrong <= records
    assert "(ids of documents not in 'corpus': 6 ('gone-0' (query 'q1'), " in warning
    assert data.relevant_docs == {"q1": ["d1"]}
    report = data.skipped.as_dict()
    assert (report["problems"], report["wrong_records"], report["records"]) == (6, 1, 3)
    assert report["unknown_document"]["count"] == 6
    assert "6 problems in 1 of 3 records of <code>" in skipped_note({str(path): report})  # report.html's wording
    with pytest.raises(DataFormatError, match=r"\n6 problems in 1 of 3 records that are wrong on their own \(ids"):
        load_dataset(path, policy=SkipPolicy(strict=True))


def test_a_line_with_several_problems_is_one_wrong_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The same counts whether the file is validated whole, converted into a rows store, or read from that store."""
    lines = [{"query": f"question {i}", "positive": f"answer {i}", "negatives": [f"wrong {i}"]} for i in range(150)]
    lines[3]["negatives"] = ["", " ", "wrong 3"]  # two empty negatives on line 4
    lines[7]["negatives"] = ["answer 7", "wrong 7"]  # the positive as a negative on line 8
    path = tmp_path / "mined.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    policy = SkipPolicy(max_skipped=2)
    with caplog.at_level(logging.WARNING):
        data = load_dataset(path, policy=policy)
        training_rows(path, policy=policy, cache_dir=tmp_path / "cache")  # converts
        training_rows(path, policy=policy, cache_dir=tmp_path / "cache")  # reads the store
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [counts(w) for w in warnings] == [(3, 2, 150)] * 3
    assert data.skipped.wrong_records == {"line 4": 2, "line 8": 1}
    with pytest.raises(DataFormatError, match=r"\n3 problems in 2 of 150 records .*: more than data\.max_skipped=1 "):
        load_dataset(path, policy=SkipPolicy(max_skipped=1))


def test_strict_refuses_what_would_be_skipped(tmp_path: Path) -> None:
    path = llamaindex_file(tmp_path / "qa.json", chunks=300, empty=(17,))
    with pytest.raises(
        DataFormatError, match=r"qa\.json: document '[0-9a-f-]+' has empty text.*\n3 problems in 3 of 900 .*strict"
    ):
        load_dataset(path, policy=SkipPolicy(strict=True))


@pytest.mark.parametrize(
    ("max_skipped", "ok"), [(0.01, False), (0.05, True), (3, True), (2, False), (0, False)], ids=str
)
def test_the_share_allowed(tmp_path: Path, max_skipped: float, ok: bool) -> None:
    path = llamaindex_file(tmp_path / "qa.json", chunks=50, empty=(3,))  # 3 of 150 records = 2%
    if ok:
        assert load_dataset(path, policy=SkipPolicy(max_skipped)).skipped.count == 3
    else:
        with pytest.raises(
            DataFormatError, match=r"\n3 problems in 3 of 150 records .*: more than data\.max_skipped=.*raise"
        ):
            load_dataset(path, policy=SkipPolicy(max_skipped))


def test_each_kind_of_bad_record_is_named(tmp_path: Path) -> None:
    path = llamaindex_file(tmp_path / "qa.json", chunks=100)
    raw = json.loads(path.read_text())
    qids, docs = list(raw["queries"]), list(raw["corpus"])
    raw["queries"][qids[0]] = "   "  # an empty question
    raw["relevant_docs"][qids[1]] = [docs[0], "node-gone"]  # one of two relevant ids is unknown: the query stays
    raw["relevant_docs"]["q-orphan"] = [docs[1]]  # an entry for no query
    del raw["relevant_docs"][qids[2]]  # a question without an answer
    path.write_text(json.dumps(raw))
    data = load_dataset(path, policy=SkipPolicy(max_skipped=10))
    assert data.skipped.ids == {
        "empty_text": [f"query {qids[0]!r}"],
        "unknown_document": [f"'node-gone' (query {qids[1]!r})"],
        "unknown_query": ["'q-orphan'"],
        "unanswered": [repr(qids[2])],
    }
    assert data.relevant_docs[qids[1]] == [docs[0]]
    assert qids[0] not in data.queries and qids[2] not in data.queries and "q-orphan" not in data.relevant_docs


def test_a_hard_negative_equal_to_its_positive_is_dropped(tmp_path: Path) -> None:
    rows = [{"query": f"question {i}", "positive": f"answer {i}", "negatives": [f"wrong {i}"]} for i in range(200)]
    rows[5]["negatives"] = ["answer 5", "wrong 5"]  # a miner that returned the positive itself
    rows[9]["negatives"] = ["  answer 9 "]  # the same text but for spaces
    path = tmp_path / "mined.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_dataset(path, policy=SkipPolicy(max_skipped=2))
    assert list(data.skipped.ids) == ["negative_is_positive"]
    assert [i.split(" (query ")[1] for i in data.skipped.ids["negative_is_positive"]] == ["'line 6')", "'line 10')"]
    examples = {e.query: e for e in training_examples(data)}
    assert examples["question 5"].negatives == ("wrong 5",) and examples["question 9"].negatives == ()
    assert all(e.positive not in e.negatives for e in examples.values())
    with pytest.raises(DataFormatError, match=r"mined\.jsonl: query 'line 6' has document 'd\d+' as a hard negative"):
        load_dataset(path, policy=SkipPolicy(strict=True))


def test_empty_lines_and_cells_are_skipped(tmp_path: Path) -> None:
    lines = [{"query": f"question {i}", "positive": f"answer {i}"} for i in range(150)]
    lines[7]["positive"] = ""
    lines[8]["negatives"] = ["", "a wrong answer"]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in lines))
    data = load_dataset(jsonl, policy=SkipPolicy(max_skipped=2))
    assert data.skipped.ids == {"empty_text": ["line 8 (positive)", "line 9 (negatives[0])"]}
    assert len(data.queries) == 149
    assert {q: [data.corpus[d] for d in ids] for q, ids in data.hard_negatives.items()} == {
        "line 9": ["a wrong answer"]
    }

    table = tmp_path / "pairs.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["query", "positive"])
        writer.writerows([[f"question {i}", "" if i == 3 else f"answer {i}"] for i in range(150)])
    data = load_dataset(table)
    assert data.skipped.ids == {"empty_text": ["row 4 (positive)"]} and len(data.queries) == 149


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"query": 7, "positive": "b"}\n', r"line 1: query is int, expected a text"),
        ('{"query": "a", "positive": "b"}\n{"query": "a" "positive": "b"}\n', r"line 2: malformed JSON"),
        ('["a", "b"]\n', r'line 1: each line must be an object with "query" and "positive"'),
    ],
)
def test_whole_file_problems_stay_errors(tmp_path: Path, content: str, expected: str) -> None:
    """Skipping is for records wrong on their own; a file of the wrong shape is refused whatever the policy."""
    path = tmp_path / "shape.jsonl"
    path.write_text(content * 200)
    with pytest.raises(DataFormatError, match=expected):
        load_dataset(path, policy=SkipPolicy(max_skipped=1000))


def test_a_run_trains_on_what_is_left_and_records_it(tmp_path: Path) -> None:
    train = llamaindex_file(tmp_path / "pdf_qa.json", chunks=100, empty=(4,), questions_per_chunk=1)  # 2 of 200: 1%
    _, val = write_toy_data(tmp_path)
    out = tmp_path / "out"
    metrics = run(compose_train(tiny_run_overrides(train, val, out, **{"trainer.max_steps": 2})))
    written = json.loads((out / "metrics.json").read_text())
    assert written == metrics and set(written) == {"base", "final", "skipped"}
    report = written["skipped"][str(train)]
    assert (report["problems"], report["wrong_records"], report["records"]) == (2, 2, 200)
    assert (out / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.max_skipped=-1", "data.max_skipped=-1 is not allowed: a fraction of the records"),
        ("data.max_skipped=1.5", "data.max_skipped=1.5 is not allowed"),
        ("data.strict=maybe", "data.strict='maybe' is not allowed: true or false"),
    ],
)
def test_policy_values_are_checked(tmp_path: Path, override: str, expected: str) -> None:
    train, val = write_toy_data(tmp_path)
    with pytest.raises(InvalidValueError, match=expected):
        run(compose_train([*tiny_run_overrides(train, val, tmp_path / "out"), override]))


@pytest.mark.slow
def test_strict_from_the_command_line_exits_2(tmp_path: Path) -> None:
    train = llamaindex_file(tmp_path / "train.json", chunks=100, empty=(4,), questions_per_chunk=1)
    out = tmp_path / "out"
    args = tiny_run_overrides(train, None, out) + ["data.strict=true"]
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "has empty text" in done.stdout + done.stderr and "Traceback" not in done.stdout + done.stderr
    assert not (out / "model").exists()
