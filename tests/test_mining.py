"""Hard-negative mining: rank window, relevant documents, margins, the faiss path and the command line."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import toy_split

from lit_embed.data.datamodule import QAPairDataModule
from lit_embed.data.formats import load_dataset, save_llamaindex_json
from lit_embed.data.schema import QADataset
from lit_embed.errors import LitEmbedError
from lit_embed.mine import main, mine_hard_negatives
from lit_embed.models.encoder import Encoder


class FakeEncoder:
    """Looks texts up in a table of hand-made vectors, so every score and rank is known."""

    device = torch.device("cpu")

    def __init__(self, vectors: dict[str, list[float]]) -> None:
        self.vectors = vectors
        self.kinds: list[str] = []

    @property
    def embedding_dim(self) -> int:
        return len(next(iter(self.vectors.values())))

    def encode(self, texts: list[str], kind: str, batch_size: int = 64) -> torch.Tensor:
        self.kinds.append(kind)
        return torch.tensor([self.vectors[t] for t in texts], dtype=torch.float32)


def scored(
    doc_scores: dict[str, float], relevant: dict[str, list[str]], queries: dict[str, str] | None = None
) -> tuple[QADataset, FakeEncoder]:
    """Documents whose cosine with every query is the given score (queries are [1, 0]; ids name the texts)."""
    queries = queries or {qid: f"query {qid}" for qid in relevant}
    corpus = {doc_id: f"text of {doc_id}" for doc_id in doc_scores}
    vectors = {text: [1.0, 0.0] for text in queries.values()}
    vectors |= {corpus[d]: [s, math.sqrt(1 - s * s)] for d, s in doc_scores.items()}
    return QADataset(queries, corpus, relevant), FakeEncoder(vectors)


def mined(dataset: QADataset, encoder: FakeEncoder, **kwargs) -> dict[str, list[str]]:
    return mine_hard_negatives(dataset, encoder, **kwargs).hard_negatives


# Non-relevant ranking (0-based): b c d e f g; the relevant a and r sit at raw ranks 0 and 3 and take no rank.
WINDOW_SCORES = {"f": 0.5, "a": 0.95, "d": 0.7, "g": 0.4, "b": 0.9, "r": 0.75, "e": 0.6, "c": 0.8}


@pytest.mark.parametrize(
    ("range_min", "range_max", "num_negatives", "margin", "expected"),
    [
        (0, 2, 2, None, ["b", "c"]),
        (2, 5, 3, None, ["d", "e", "f"]),
        (2, 5, 2, None, ["d", "e"]),
        (5, 100, 3, None, ["g"]),
        # The margin (positive = min(0.95, 0.75) = 0.75, keep < 0.72) drops c and b inside the window; ranks stay
        # put, so the window does not slide down to replace them.
        (0, 4, 3, 0.03, ["d", "e"]),
        (1, 4, 3, 0.03, ["d", "e"]),
    ],
)
def test_rank_window_counts_only_non_relevant_documents(
    range_min: int, range_max: int, num_negatives: int, margin: float | None, expected: list[str]
) -> None:
    dataset, encoder = scored(WINDOW_SCORES, {"q": ["a", "r"]})
    negatives = mined(
        dataset,
        encoder,
        range_min=range_min,
        range_max=range_max,
        num_negatives=num_negatives,
        absolute_margin=margin,
    )
    assert negatives == {"q": expected}
    assert sorted(encoder.kinds) == ["document", "query"]  # each side embedded once, with its own prompt


def test_candidates_dropped_by_the_margin_are_not_replaced_from_past_range_max() -> None:
    # q1's three relevant documents make the search go deeper than range_max non-relevant hits for q0.
    dataset, encoder = scored(WINDOW_SCORES, {"q0": ["a"], "q1": ["a", "b", "c"]})
    negatives = mined(dataset, encoder, range_max=3, num_negatives=3, absolute_margin=0.12)
    # q0: window b c r, keep < 0.83. q1: window r d e, keep < 0.8 - 0.12 = 0.68.
    assert negatives == {"q0": ["c", "r"], "q1": ["e"]}


def test_relevant_documents_their_copies_and_same_text_queries_are_never_negatives() -> None:
    dataset, encoder = scored(
        {"a": 0.9, "a_copy": 0.9, "b": 0.85, "c": 0.5, "d": 0.4},
        {"q0": ["a"], "q1": ["b"]},
        queries={"q0": "find x", "q1": "find x"},  # one question under two ids: b answers q0 too
    )
    dataset.corpus["a_copy"] = dataset.corpus["a"]  # the same document under another id
    assert mined(dataset, encoder, num_negatives=3) == {"q0": ["c", "d"], "q1": ["c", "d"]}
    assert mined(dataset, encoder, num_negatives=1, range_max=1) == {"q0": ["c"], "q1": ["c"]}


def test_absolute_margin_keeps_only_scores_below_positive_minus_margin() -> None:
    # "twin" has the positive's vector, so it scores exactly the positive's 0.9: an unlabelled answer.
    dataset, encoder = scored({"a": 0.9, "twin": 0.9, "b": 0.86, "c": 0.84, "d": 0.7}, {"q": ["a"]})
    assert mined(dataset, encoder, absolute_margin=0.05) == {"q": ["c", "d"]}  # keep < 0.85
    assert mined(dataset, encoder, absolute_margin=0.0) == {"q": ["b", "c", "d"]}  # strict: the tie goes
    assert mined(dataset, encoder, absolute_margin=0.3) == {}  # keep < 0.6: nothing left


def test_relative_margin_keeps_only_scores_below_positive_minus_a_fraction_of_it() -> None:
    dataset, encoder = scored({"a": 0.8, "twin": 0.8, "b": 0.75, "c": 0.73, "d": 0.71, "e": 0.5}, {"q": ["a"]})
    assert mined(dataset, encoder, relative_margin=0.1) == {"q": ["d", "e"]}  # keep < 0.8 * 0.9 = 0.72
    assert mined(dataset, encoder, relative_margin=0.0) == {"q": ["b", "c", "d"]}


def test_relative_margin_below_a_negative_positive_score_uses_its_magnitude() -> None:
    # Positive -0.5, margin 0.2: keep < -0.5 - 0.5 * 0.2 = -0.6. (1 - margin) * positive = -0.4 would keep b at
    # -0.55, and "c" scores above the positive itself.
    dataset, encoder = scored({"a": -0.5, "c": 0.3, "b": -0.55, "d": -0.65, "e": -0.9}, {"q": ["a"]})
    assert mined(dataset, encoder, relative_margin=0.2) == {"q": ["d", "e"]}


def test_margin_is_measured_from_the_lowest_scoring_relevant_document() -> None:
    dataset, encoder = scored({"a": 0.9, "b": 0.6, "c": 0.7, "d": 0.58, "e": 0.5}, {"q": ["a", "b"]})
    # Lowest positive 0.6: keep < 0.55. Measured from the first positive (0.9) c and d would pass.
    assert mined(dataset, encoder, absolute_margin=0.05) == {"q": ["e"]}


def test_num_negatives_caps_each_query_and_shortfalls_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    dataset, encoder = scored(
        {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6, "e": 0.5}, {"q0": ["a"], "q1": ["a", "b", "c", "d"]}
    )
    with caplog.at_level(logging.INFO, logger="lit_embed.mine"):
        negatives = mined(dataset, encoder, num_negatives=2)
    assert negatives == {"q0": ["b", "c"], "q1": ["e"]}
    assert "Mined 3 hard negatives for 2 queries" in caplog.text
    assert "1 of 2 queries got fewer than 2 negatives (0 got none)" in caplog.text


def test_result_is_a_copy_whose_negatives_replace_the_old_ones() -> None:
    dataset, encoder = scored({"a": 0.9, "b": 0.8, "c": 0.7}, {"q": ["a"]})
    dataset.hard_negatives = {"q": ["c"]}
    result = mine_hard_negatives(dataset, encoder, num_negatives=1)
    assert result.hard_negatives == {"q": ["b"]}
    assert dataset.hard_negatives == {"q": ["c"]}
    assert (result.queries, result.corpus, result.relevant_docs) == (
        dataset.queries,
        dataset.corpus,
        dataset.relevant_docs,
    )


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"num_negatives": 0}, "num_negatives=0"),
        ({"range_min": -1}, "range_min=-1"),
        ({"range_min": 5, "range_max": 5}, "range_max=5"),
        ({"num_negatives": 4, "range_min": 8, "range_max": 10}, "num_negatives=4"),
        ({"absolute_margin": -0.1}, "absolute_margin=-0.1"),
        ({"relative_margin": -0.1}, "relative_margin=-0.1"),
        ({"relative_margin": float("nan")}, "relative_margin=nan"),
        ({"batch_size": 0}, "batch_size=0"),
    ],
)
def test_unusable_settings_are_user_errors(settings: dict, named: str) -> None:
    dataset, encoder = scored({"a": 0.9, "b": 0.8}, {"q": ["a"]})
    with pytest.raises(LitEmbedError, match=named):
        mine_hard_negatives(dataset, encoder, **settings)


def random_dataset(seed: int = 0) -> tuple[QADataset, FakeEncoder]:
    """40 documents and 12 queries with random vectors, 1-2 relevant documents each."""
    generator = torch.Generator().manual_seed(seed)
    corpus = {f"d{i}": f"document {i}" for i in range(40)}
    queries = {f"q{i}": f"query {i}" for i in range(12)}
    relevant = {qid: [f"d{(3 * i + k) % 40}" for k in range(1 + i % 2)] for i, qid in enumerate(queries)}
    texts = [*corpus.values(), *queries.values()]
    vectors = torch.randn(len(texts), 8, generator=generator).tolist()
    return QADataset(queries, corpus, relevant), FakeEncoder(dict(zip(texts, vectors, strict=True)))


SEARCH_SETTINGS = dict(num_negatives=4, range_min=1, range_max=15, relative_margin=0.05)


def test_chunked_search_gives_the_same_negatives() -> None:
    dataset, encoder = random_dataset()
    whole = mined(dataset, encoder, corpus_chunk_size=50_000, use_faiss=False, **SEARCH_SETTINGS)
    assert whole and all(len(n) <= 4 for n in whole.values())
    assert mined(dataset, encoder, corpus_chunk_size=7, use_faiss=False, **SEARCH_SETTINGS) == whole


def test_faiss_search_gives_the_same_negatives_as_torch() -> None:
    pytest.importorskip("faiss")
    dataset, encoder = random_dataset()
    torch_result = mined(dataset, encoder, use_faiss=False, **SEARCH_SETTINGS)
    assert mined(dataset, encoder, use_faiss=True, **SEARCH_SETTINGS) == torch_result
    assert mined(dataset, encoder, **SEARCH_SETTINGS) == torch_result  # None picks faiss when installed


def test_without_faiss_the_default_searches_with_torch_and_use_faiss_true_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    dataset, encoder = random_dataset()
    assert mined(dataset, encoder, **SEARCH_SETTINGS) == mined(dataset, encoder, use_faiss=False, **SEARCH_SETTINGS)
    with pytest.raises(LitEmbedError, match="pip install faiss-cpu"):
        mine_hard_negatives(dataset, encoder, use_faiss=True)


def test_cli_writes_jsonl_that_training_reads(tiny_model_path: str, tmp_path: Path) -> None:
    dataset = toy_split(24)
    dataset.relevant_docs["q0"].append("d1")  # --use-all-docs: q0 gives two rows
    save_llamaindex_json(dataset, tmp_path / "train.json")
    out = tmp_path / "mined" / "train.jsonl"
    main([str(tmp_path / "train.json"), str(out), "--model", tiny_model_path, "--num-negatives", "2"])
    main([str(tmp_path / "train.json"), str(out), "--model", tiny_model_path, "--num-negatives", "2", "--use-all-docs"])

    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 25
    assert all(len(row["negatives"]) == 2 and row["positive"] not in row["negatives"] for row in rows)
    # The negatives are the two best-ranked documents that do not answer the query, under the same encoder.
    encoder = Encoder(tiny_model_path)
    doc_ids = list(dataset.corpus)
    scores = (
        encoder.encode([dataset.queries["q5"]], "query")
        @ encoder.encode([dataset.corpus[d] for d in doc_ids], "document").T
    )
    ranked = [doc_ids[j] for j in scores[0].argsort(descending=True).tolist() if doc_ids[j] != "d5"]
    q5_row = next(row for row in rows if row["query"] == dataset.queries["q5"])
    assert q5_row["negatives"] == [dataset.corpus[d] for d in ranked[:2]]

    reloaded = load_dataset(out)
    assert len(reloaded.queries) == 24 and len(reloaded.hard_negatives) == 24
    datamodule = QAPairDataModule(train_path=str(out), batch_size=8, use_all_docs=True)
    datamodule.prepare_data()
    rows = datamodule.rows
    assert len(set(rows.query[rows.negatives.lengths > 0].tolist())) == 24  # every query has its negatives


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["missing.json", "out.jsonl"], "no such file"),
        (["train.json", "out.json"], "must be a .jsonl"),
        (["train.json", "out.jsonl", "--range-min", "5", "--range-max", "5"], "range_max=5"),
    ],
)
def test_cli_bad_input_exits_2_with_a_message(
    extra: list[str], message: str, tiny_model_path: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_llamaindex_json(toy_split(4), tmp_path / "train.json")
    args = [str(tmp_path / a) if i < 2 else a for i, a in enumerate(extra)] + ["--model", tiny_model_path]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in caplog.text
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_refuses_two_margins(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train.json", "out.jsonl", "--relative-margin", "0.05", "--absolute-margin", "0.1"])
    assert exit_info.value.code == 2


def test_command_line_settings_are_checked_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("lit_embed.mine._load_encoder", lambda *args: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as stopped:
        main(["no_such.json", str(tmp_path / "out.jsonl"), "--batch-size", "0"])
    assert stopped.value.code == 2 and "batch_size=0: embed at least 1 text" in caplog.text


def test_a_teacher_drops_what_it_scores_as_high_as_the_positive_and_its_scores_are_kept() -> None:
    """As sentence-transformers' cross_encoder: the teacher, not the ranker, decides the margins."""
    dataset, encoder = scored({"a": 0.95, "b": 0.9, "c": 0.8, "d": 0.7, "e": 0.6}, {"q": ["a"]})
    teacher_scores = {"text of a": 0.7, "text of b": 0.1, "text of c": 0.9, "text of d": 0.3, "text of e": 0.69}
    calls = []

    def teacher(pairs: list[tuple[str, str]]) -> list[float]:
        calls.append(len(pairs))
        return [teacher_scores[document] for _, document in pairs]

    result = mine_hard_negatives(dataset, encoder, num_negatives=3, range_max=4, teacher=teacher)
    # c scores above the positive for the teacher: an unlabelled answer; e, just below it, stays.
    assert result.hard_negatives == {"q": ["b", "d", "e"]}
    assert result.teacher_scores == {"q": {"a": 0.7, "b": 0.1, "d": 0.3, "e": 0.69}}
    assert calls == [4, 1]  # the window's four candidates, then the positive: nothing else is scored
    margin = mine_hard_negatives(dataset, encoder, num_negatives=3, range_max=4, absolute_margin=0.5, teacher=teacher)
    assert margin.hard_negatives == {"q": ["b"]}  # d (0.3) is within 0.5 of the positive (0.7)


def test_command_line_teacher_writes_scores_that_train_with_margin_mse(
    tmp_path: Path, tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from lit_embed.models.tiny import build_tiny_cross_encoder

    teacher = build_tiny_cross_encoder(tmp_path_factory.mktemp("teacher") / "cross_encoder")
    save_llamaindex_json(toy_split(30), tmp_path / "train.json")
    out = tmp_path / "mined.jsonl"
    main(
        [
            str(tmp_path / "train.json"),
            str(out),
            "--model",
            tiny_model_path,
            "--num-negatives",
            "2",
            "--teacher",
            teacher,
        ]
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(len(row["scores"]) == 1 + len(row["negatives"]) for row in rows)
    assert all(score < row["scores"][0] for row in rows for score in row["scores"][1:])
    data = load_dataset(out)
    assert data.teacher_scores and all(math.isfinite(s) for q in data.teacher_scores.values() for s in q.values())
