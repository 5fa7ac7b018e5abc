"""Tests for the offline stdlib docstring/code dataset."""

from __future__ import annotations

import ast
import logging
import sysconfig
import textwrap
from pathlib import Path

import pytest

from lit_embed.data import stdlib
from lit_embed.data.schema import QADataset
from lit_embed.data.stdlib import build_stdlib_dataset, first_sentence


@pytest.fixture(scope="module")
def all_pairs() -> list[stdlib._Pair]:
    """Every pair of the real stdlib, parsed once so the other tests can skip re-parsing it."""
    return stdlib._collect_pairs(Path(sysconfig.get_paths()["stdlib"]))


@pytest.fixture(scope="module")
def split(all_pairs) -> tuple[QADataset, QADataset]:
    """The default build (test_build_is_deterministic checks it against a real one)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stdlib, "_collect_pairs", lambda root: list(all_pairs))
        return build_stdlib_dataset()


@pytest.fixture
def cached_pairs(monkeypatch, all_pairs) -> list[stdlib._Pair]:
    monkeypatch.setattr(stdlib, "_collect_pairs", lambda root: list(all_pairs))
    return all_pairs


def _pairs(dataset: QADataset) -> list[tuple[str, str]]:
    return [(dataset.queries[q], dataset.corpus[d[0]]) for q, d in dataset.relevant_docs.items()]


def test_build_is_deterministic(split):
    again = build_stdlib_dataset()
    for first, second in zip(split, again, strict=True):
        assert list(first.queries.items()) == list(second.queries.items())
        assert list(first.corpus.items()) == list(second.corpus.items())
        assert first.relevant_docs == second.relevant_docs


def test_seed_changes_the_split(cached_pairs, split):
    _, val = build_stdlib_dataset(seed=1)
    assert set(val.queries) != set(split[1].queries)


def test_train_and_val_share_no_text(split):
    train, val = split
    assert not set(train.queries.values()) & set(val.queries.values())
    assert not set(train.corpus.values()) & set(val.corpus.values())


def test_no_duplicate_texts_within_a_split(split):
    for dataset in split:
        assert len(set(dataset.queries.values())) == len(dataset.queries)
        assert len(set(dataset.corpus.values())) == len(dataset.corpus)


def test_each_query_has_exactly_one_relevant_doc_in_the_corpus(split):
    for dataset in split:
        assert set(dataset.relevant_docs) == set(dataset.queries)
        assert all(len(docs) == 1 and docs[0] in dataset.corpus for docs in dataset.relevant_docs.values())
        assert {docs[0] for docs in dataset.relevant_docs.values()} == set(dataset.corpus)
        assert all(qid.startswith("q:") and docs == [f"d:{qid[2:]}"] for qid, docs in dataset.relevant_docs.items())


def test_documents_are_functions_without_their_docstring(split):
    for dataset in split:
        for query, document in _pairs(dataset):
            assert query not in document
            assert document.startswith(("def ", "async def ", "@"))
            function = ast.parse(document).body[0]
            assert isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
            assert ast.get_docstring(function) is None
            assert len(document.splitlines()) <= stdlib.MAX_DOCUMENT_LINES
            assert stdlib.MIN_QUERY_WORDS <= len(query.split()) <= stdlib.MAX_QUERY_WORDS


def test_default_sizes_respect_the_caps(split):
    train, val = split
    assert len(val.queries) == 300
    assert 0 < len(train.queries) <= 2000


def test_caps_truncate_without_reshuffling(cached_pairs, split):
    train, val = build_stdlib_dataset(num_train=100, num_val=20)
    assert (len(train.queries), len(val.queries)) == (100, 20)
    # Smaller caps take a prefix of the same order, so the splits nest.
    assert list(val.queries) == list(split[1].queries)[:20]
    assert list(train.queries) == list(split[0].queries)[:100]


def test_none_caps_take_what_the_other_split_leaves(cached_pairs):
    train, val = build_stdlib_dataset(num_train=None, num_val=10)
    assert (len(train.queries), len(val.queries)) == (len(cached_pairs) - 10, 10)
    train, val = build_stdlib_dataset(num_train=10, num_val=None)
    assert (len(train.queries), len(val.queries)) == (10, len(cached_pairs) - 10)
    with pytest.raises(ValueError, match="both be None"):
        build_stdlib_dataset(num_train=None, num_val=None)
    with pytest.raises(ValueError, match="num_val"):
        build_stdlib_dataset(num_val=-1)


def test_too_few_pairs_asked_for_takes_all_and_warns(cached_pairs, caplog):
    with caplog.at_level(logging.WARNING, logger=stdlib.__name__):
        train, val = build_stdlib_dataset(num_train=10**6, num_val=50)
    assert (len(train.queries), len(val.queries)) == (len(cached_pairs) - 50, 50)
    assert "only" in caplog.text


def test_tiny_stdlib_dir_raises_a_clear_error(tmp_path):
    (tmp_path / "tiny.py").write_text('def f(x):\n    """Return x plus one, always."""\n    y = x\n    return y + 1\n')
    with pytest.raises(ValueError, match="qa_json") as err:
        build_stdlib_dataset(stdlib_dir=str(tmp_path))
    assert str(tmp_path) in str(err.value)


def _function(name: str, doc: str, body: str = "y = x + 1\nreturn y", indent: str = "") -> str:
    source = f'def {name}(x):\n    """{doc}"""\n' + textwrap.indent(body, "    ") + "\n"
    return textwrap.indent(source, indent)


def test_skip_rules_on_a_synthetic_library(tmp_path, caplog):
    good = [_function(f"good{i}", f"Compute the value number {i} for x.", f"y = x + {i}\nreturn y") for i in range(60)]
    skipped = [
        _function("_private", "Compute a private thing for x."),
        _function("short", "Too short."),
        _function("trivial", "Compute nothing at all here.", "pass"),
        _function("notimpl", "Compute nothing at all, subclasses do.", "raise NotImplementedError(\n    'no'\n)"),
        _function("oneline", "Return x plus one, nothing else.", "return x + 1"),
        _function("long", "Compute a very long function of x.", "\n".join(f"x += {i}" for i in range(70))),
        _function("dup_a", "Compute the same thing twice over.", "y = 1\nreturn y"),
        _function("dup_b", "Compute the same thing twice over.", "y = 2\nreturn y"),
        "class _Hidden:\n" + _function("method", "Compute inside a private class.", indent="    "),
    ]
    method = _function("method", "Compute a value inside a public class.", indent="    ")
    (tmp_path / "lib.py").write_text("\n".join(good + skipped) + "class Public:\n" + method)
    (tmp_path / "_private_module.py").write_text(_function("hidden", "Compute something hidden away here."))
    (tmp_path / "broken.py").write_text("def broken(:\n")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "mod.py").write_text(_function("tested", "Compute something only tests need."))

    with caplog.at_level(logging.INFO, logger=stdlib.__name__):
        train, val = build_stdlib_dataset(num_train=None, num_val=0, stdlib_dir=str(tmp_path))

    assert not val.queries
    expected = {f"q:lib.good{i}" for i in range(60)} | {"q:lib.Public.method"}
    assert set(train.queries) == expected
    assert train.corpus["d:lib.Public.method"] == "def method(x):\n    y = x + 1\n    return y"
    log = caplog.text
    for reason in (
        "files that failed to parse",
        "private or non-module files",
        "excluded or private directories",
    ):
        assert f"1 {reason}" in log
    assert "3 trivial bodies" in log and "2 pairs with a repeated query" in log


@pytest.mark.parametrize(
    ("docstring", "sentence"),
    [
        ("Return the value.  More text here.", "Return the value."),
        ("Return the\n    wrapped value.\nMore.", "Return the wrapped value."),
        ("Return x, e.g. one. Then more.", "Return x, e.g. one."),
        ("Return the version 3.11 of it\n\nSecond paragraph.", "Return the version 3.11 of it"),
    ],
)
def test_first_sentence(docstring, sentence):
    assert first_sentence(docstring) == sentence
