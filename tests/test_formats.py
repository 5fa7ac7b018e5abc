"""Loading, validating and writing LlamaIndex JSON and JSONL pair files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lit_embed.data.formats import load_dataset, save_jsonl, save_llamaindex_json
from lit_embed.data.schema import QADataset, TrainingExample, training_examples
from lit_embed.errors import DataFormatError

# Shaped exactly like LlamaIndex's EmbeddingQAFinetuneDataset.save_json output (uuid ids, indent=4).
LLAMAINDEX_FILE = {
    "queries": {
        "6f1c8a6e-1d9e-4c43-9a55-0a3b6d6d2f01": "What does the report say about revenue?",
        "0b7d2d3c-5b3e-4f0e-8f9a-1c2d3e4f5a6b": "Who founded the company?",
    },
    "corpus": {
        "node-a": "Revenue grew 12% in 2023, driven by services.",
        "node-b": "The company was founded in 1998 by two engineers.",
        "node-c": "Headquarters moved to Berlin in 2010.",
    },
    "relevant_docs": {
        "6f1c8a6e-1d9e-4c43-9a55-0a3b6d6d2f01": ["node-a"],
        "0b7d2d3c-5b3e-4f0e-8f9a-1c2d3e4f5a6b": ["node-b", "node-c"],
    },
    "mode": "text",
}


def write(path: Path, payload) -> Path:
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload, indent=4), encoding="utf-8")
    return path


def test_llamaindex_json_loads_unchanged(tmp_path: Path) -> None:
    data = load_dataset(write(tmp_path / "train.json", LLAMAINDEX_FILE))
    assert data.queries == LLAMAINDEX_FILE["queries"]
    assert data.corpus == LLAMAINDEX_FILE["corpus"]
    assert data.relevant_docs == LLAMAINDEX_FILE["relevant_docs"]


def test_saved_json_is_llamaindex_shaped_and_round_trips(tmp_path: Path) -> None:
    data = load_dataset(write(tmp_path / "in.json", LLAMAINDEX_FILE))
    save_llamaindex_json(data, tmp_path / "out.json")
    raw = json.loads((tmp_path / "out.json").read_text())
    assert (
        raw == LLAMAINDEX_FILE
    )  # same keys, same values, mode "text": what EmbeddingQAFinetuneDataset.from_json reads
    assert load_dataset(tmp_path / "out.json") == data


def test_use_all_docs(tmp_path: Path) -> None:
    data = load_dataset(write(tmp_path / "train.json", LLAMAINDEX_FILE))
    first_only = training_examples(data, use_all_docs=False)
    every_doc = training_examples(data, use_all_docs=True)
    assert [e.positive for e in first_only] == [
        LLAMAINDEX_FILE["corpus"]["node-a"],
        LLAMAINDEX_FILE["corpus"]["node-b"],
    ]
    assert len(every_doc) == 3
    assert every_doc[-1].positive == LLAMAINDEX_FILE["corpus"]["node-c"]


def test_jsonl_with_and_without_negatives(tmp_path: Path) -> None:
    rows = [
        {"query": "q one", "positive": "doc one", "negatives": ["doc two", "doc three"]},
        {"query": "q two", "positive": "doc two"},
        {"query": "q one", "positive": "doc four"},  # same query again: a second relevant document
    ]
    path = write(tmp_path / "pairs.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    data = load_dataset(path)
    assert len(data.queries) == 2 and len(data.corpus) == 4
    q_one = next(q for q, t in data.queries.items() if t == "q one")
    assert [data.corpus[d] for d in data.relevant_docs[q_one]] == ["doc one", "doc four"]
    assert [data.corpus[d] for d in data.hard_negatives[q_one]] == ["doc two", "doc three"]
    examples = training_examples(data, use_all_docs=True)
    assert examples[0] == TrainingExample("q one", "doc one", ("doc two", "doc three"))
    assert examples[0].query_id == "line 1"  # JSONL query ids say where the query first appears
    save_jsonl(examples, tmp_path / "again.jsonl")
    assert training_examples(load_dataset(tmp_path / "again.jsonl"), use_all_docs=True) == examples


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("bad.json", '{"queries": {"q1": "x"},\n "corpus": ', r"bad\.json, line 2.*malformed JSON"),
        ("keys.json", {"queries": {}, "corpus": {}}, r"keys\.json: missing key\(s\) \['relevant_docs'\]"),
        (
            "ghost.json",
            {"queries": {"q1": "x"}, "corpus": {"d1": "y"}, "relevant_docs": {"q1": ["d9"]}},
            r"ghost\.json: query 'q1' names document 'd9', which is not in 'corpus'",
        ),
        (
            "empty.json",
            {"queries": {"q1": "  "}, "corpus": {"d1": "y"}, "relevant_docs": {"q1": ["d1"]}},
            r"empty\.json: query 'q1' has empty text",
        ),
        (
            "emptydoc.json",
            {"queries": {"q1": "x"}, "corpus": {"d1": ""}, "relevant_docs": {"q1": ["d1"]}},
            r"emptydoc\.json: document 'd1' has empty text",
        ),
        (
            "orphan.json",
            {
                "queries": {"q1": "x", "q2": "z"},
                "corpus": {"d1": "y"},
                "relevant_docs": {"q1": ["d1"], "q2": []},
            },
            r"orphan\.json: 1 of 2 queries have no relevant document \(first: 'q2'\)",
        ),
        (
            "unknownq.json",
            {"queries": {"q1": "x"}, "corpus": {"d1": "y"}, "relevant_docs": {"q1": ["d1"], "q7": ["d1"]}},
            r"unknownq\.json: relevant_docs names query 'q7'",
        ),
        (
            "dup.json",
            '{"queries": {"q1": "x", "q1": "again"}, "corpus": {"d1": "y"}, "relevant_docs": {"q1": ["d1"]}}',
            r"dup\.json: id 'q1' appears twice",
        ),
        (
            "rows.jsonl",
            '{"query": "a", "positive": "b"}\n{"query": "a"\n',
            r"rows\.jsonl, line 2: malformed JSON",
        ),
        (
            "keys.jsonl",
            '{"query": "a", "positive": "b"}\n{"question": "a"}\n',
            r"keys\.jsonl, line 2: .*\"positive\"",
        ),
        ("blank.jsonl", '{"query": "a", "positive": " "}\n', r"blank\.jsonl, line 1: positive is empty"),
        ("data.tsv", "query\tpositive\n", r"data\.tsv: unknown extension '\.tsv'"),
    ],
)
def test_bad_files_name_the_file_and_place(tmp_path: Path, name: str, content, expected: str) -> None:
    with pytest.raises(DataFormatError, match=expected):
        load_dataset(write(tmp_path / name, content))


def test_non_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"query": "a", "positive": "b"}\n{"query": "caf\xe9", "positive": "b"}\n')
    with pytest.raises(DataFormatError, match=r"latin1\.jsonl, line 2: the file is not valid UTF-8"):
        load_dataset(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="no such file"):
        load_dataset(tmp_path / "nope.json")


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "data.json"
    target.write_text("previous content")
    data = QADataset({"q": "x"}, {"d": "y"}, {"q": ["d"]})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lit_embed.data.formats.os.replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_llamaindex_json(data, target)
    assert target.read_text() == "previous content"
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind


def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path: Path) -> None:
    """Windows tools and spreadsheet exports start UTF-8 files with a BOM; every reader shares read_text."""
    jsonl, json_file = tmp_path / "pairs.jsonl", tmp_path / "qa.json"
    jsonl.write_bytes(
        b"\xef\xbb\xbf" + b'{"query": "q one", "positive": "doc one"}\n{"query": "q two", "positive": "d"}\n'
    )
    json_file.write_bytes(b"\xef\xbb\xbf" + json.dumps(LLAMAINDEX_FILE).encode())
    assert sorted(load_dataset(jsonl).queries.values()) == ["q one", "q two"]
    assert load_dataset(json_file).queries == LLAMAINDEX_FILE["queries"]
