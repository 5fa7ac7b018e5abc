"""A finetuned model in the clients that serve retrieval, no mocks: LlamaIndex (HuggingFaceEmbedding,
AdapterEmbeddingModel, VectorStoreIndex), Qdrant's local mode, and ``lit-embed-eval --index``. Each must rank the
validation corpus as lit_embed's own exact search does, or, where a client cannot (an adapter's queries through
HuggingFaceEmbedding alone, a model's prompts), the test pins down what it does instead, as the README says."""

from __future__ import annotations

import itertools
import json
import logging
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import compose_train, tiny_run_overrides, write_toy_data
from sentence_transformers import SentenceTransformer

from lit_embed.data.formats import load_dataset
from lit_embed.errors import LitEmbedError
from lit_embed.evaluate import evaluate
from lit_embed.evaluate import main as eval_main
from lit_embed.evaluation.ir import exact_search
from lit_embed.models.encoder import Encoder
from lit_embed.train import run

pytest.importorskip("llama_index.embeddings.huggingface", reason="pip install 'lit_embed[clients]'")
pytest.importorskip("llama_index.embeddings.adapter", reason="pip install 'lit_embed[clients]'")
pytest.importorskip("qdrant_client", reason="pip install 'lit_embed[clients]'")

from llama_index.core import VectorStoreIndex  # noqa: E402
from llama_index.core.schema import TextNode  # noqa: E402
from llama_index.embeddings.adapter import AdapterEmbeddingModel  # noqa: E402
from llama_index.embeddings.adapter.utils import LinearLayer, TwoLayerNN  # noqa: E402
from llama_index.embeddings.huggingface import HuggingFaceEmbedding  # noqa: E402

K = 10
PROMPTS = {"query": "query: ", "document": "passage: "}
TEXTS = ["how do I parse json number 3?", "sort a list of tuples by key", "def helper_3():\n    return 3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny-model runs on the toy data: full finetuning with and without prompts, linear and MLP adapters."""
    root = tmp_path_factory.mktemp("clients")
    train, val = write_toy_data(root, num_val=40)
    last = {"load_best_model_at_end": "false"}  # model/ is the trained weights, not step 0's
    adapter = {**last, "trainer.max_epochs": 3, "trainer.max_steps": -1, "optimizer.lr": 1e-2}
    adapter_method = ["method=adapter", f"method.encoder.cache_dir={root / 'cache'}"]
    prompted = {f"model.{kind}_prompt": f"'{prompt}'" for kind, prompt in PROMPTS.items()}
    overrides = {
        "full": tiny_run_overrides(train, val, root / "full", **last),
        "prompted": tiny_run_overrides(train, val, root / "prompted", **last, **prompted),
        "adapter": tiny_run_overrides(train, val, root / "adapter", **adapter) + adapter_method,
        "mlp": tiny_run_overrides(train, val, root / "mlp", **adapter) + adapter_method + ["adapter=mlp"],
    }
    warnings = {}
    for name, values in overrides.items():
        with LoggedWarnings("lit_embed.models.adapted") as logged:
            run(compose_train(values))
        warnings[name] = logged.messages
    return {"val": val, "warnings": warnings, **{name: root / name for name in overrides}}


class LoggedWarnings(logging.Handler):
    """The warnings one logger logs inside a ``with`` block."""

    def __init__(self, logger: str) -> None:
        super().__init__(logging.WARNING)
        self.logger, self.messages = logging.getLogger(logger), []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> LoggedWarnings:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)


def exact_ranking(model_dir: Path, val: Path) -> tuple[dict[str, set[str]], dict[str, dict[str, float]]]:
    """lit_embed's exact search (the IR evaluation's): each query's top-K ids, and its score of every document."""
    data = load_dataset(val)
    encoder = Encoder(model_dir)
    corpus_ids = sorted(data.corpus)  # id order: the evaluation's tie order
    queries = encoder.encode(list(data.queries.values()), "query")
    corpus = encoder.encode([data.corpus[d] for d in corpus_ids], "document")
    _, indices = exact_search(queries, corpus, K)  # [Q, K]
    scores = F.normalize(queries, dim=-1) @ F.normalize(corpus, dim=-1).T  # [Q, C]
    top = {q: {corpus_ids[j] for j in row} for q, row in zip(data.queries, indices.tolist(), strict=True)}
    rows = zip(data.queries, scores.tolist(), strict=True)
    all_scores = {q: dict(zip(corpus_ids, row, strict=True)) for q, row in rows}
    return top, all_scores


def assert_same_top_k(got: dict[str, list[str]], model_dir: Path, val: Path) -> None:
    """Same top-K documents per query as the exact search; a swap is allowed only among equal scores (1e-6)."""
    expected, scores = exact_ranking(model_dir, val)
    assert got.keys() == expected.keys()
    for query_id, ids in got.items():
        assert len(ids) == len(set(ids)) == K, ids
        kth = sorted(scores[query_id].values(), reverse=True)[K - 1]
        for doc_id in expected[query_id] ^ set(ids):
            assert abs(scores[query_id][doc_id] - kth) <= 1e-6, (query_id, doc_id, expected[query_id], ids)


def llamaindex_top_k(embed_model, val: Path) -> dict[str, list[str]]:
    """Each validation query's top-K node ids from a VectorStoreIndex (core's in-memory store) of the corpus."""
    data = load_dataset(val)
    nodes = [TextNode(id_=doc_id, text=text) for doc_id, text in data.corpus.items()]
    retriever = VectorStoreIndex(nodes, embed_model=embed_model).as_retriever(similarity_top_k=K)
    return {q: [hit.node.node_id for hit in retriever.retrieve(text)] for q, text in data.queries.items()}


def test_llamaindex_retrieves_as_the_exact_search(runs: dict[str, Path]) -> None:
    embed_model = HuggingFaceEmbedding(model_name=str(runs["full"] / "model"), device="cpu")
    assert_same_top_k(llamaindex_top_k(embed_model, runs["val"]), runs["full"] / "model", runs["val"])


def test_llamaindex_reranks_as_the_pipeline_evaluation(runs: dict[str, Path], tmp_path: Path) -> None:
    """LlamaIndex's SentenceTransformerRerank over a VectorStoreIndex of the finetuned retriever orders each query's
    top-K as lit_embed's two-stage evaluation does (``lit-embed-eval --rerank``): the same candidates, and the same
    order up to swaps of near-equal scores (1e-6)."""
    from llama_index.core.postprocessor import SentenceTransformerRerank
    from sentence_transformers import CrossEncoder

    from lit_embed.evaluation.rerank import first_stage
    from lit_embed.models.tiny import build_tiny_cross_encoder

    reranker = Path(build_tiny_cross_encoder(tmp_path / "reranker", seed=1))
    settings = json.loads((reranker / "config_sentence_transformers.json").read_text())
    settings["activation_fn"] = "torch.nn.modules.linear.Identity"  # raw scores: a random model's sigmoids tie
    (reranker / "config_sentence_transformers.json").write_text(json.dumps(settings))
    model_dir, data = runs["full"] / "model", load_dataset(runs["val"])
    candidates = first_stage(Encoder(model_dir), data, K)
    scores = CrossEncoder(str(reranker), device="cpu").predict(candidates.pairs(data)).reshape(-1, K)

    nodes = [TextNode(id_=doc_id, text=text) for doc_id, text in data.corpus.items()]
    embed_model = HuggingFaceEmbedding(model_name=str(model_dir), device="cpu")
    retriever = VectorStoreIndex(nodes, embed_model=embed_model).as_retriever(similarity_top_k=K)
    rerank = SentenceTransformerRerank(model=str(reranker), top_n=K, device="cpu")
    for row, (query_id, ids) in enumerate(zip(candidates.query_ids, candidates.documents.tolist(), strict=True)):
        ours = {candidates.corpus_ids[d]: float(score) for d, score in zip(ids, scores[row], strict=True)}
        text = data.queries[query_id]
        got = [hit.node.node_id for hit in rerank.postprocess_nodes(retriever.retrieve(text), query_str=text)]
        assert set(got) == set(ours), query_id
        assert all(ours[a] >= ours[b] - 1e-6 for a, b in itertools.pairwise(got)), (query_id, got, ours)


def test_llamaindex_adapter_retrieves_as_the_exact_search(runs: dict[str, Path]) -> None:
    out = runs["adapter"]
    base = HuggingFaceEmbedding(model_name=str(out / "model"), device="cpu")
    embed_model = AdapterEmbeddingModel(base, str(out / "llamaindex_adapter"), adapter_cls=LinearLayer, device="cpu")
    assert_same_top_k(llamaindex_top_k(embed_model, runs["val"]), out / "model", runs["val"])


def test_qdrant_local_mode_retrieves_as_the_exact_search(runs: dict[str, Path]) -> None:
    from qdrant_client import QdrantClient, models

    data = load_dataset(runs["val"])
    model = SentenceTransformer(str(runs["full"] / "model"), device="cpu")
    client = QdrantClient(":memory:")
    client.create_collection(
        "val", vectors_config=models.VectorParams(size=model.get_embedding_dimension(), distance=models.Distance.COSINE)
    )
    doc_ids = list(data.corpus)
    vectors = model.encode_document([data.corpus[d] for d in doc_ids])
    payloads = [{"doc_id": doc_id} for doc_id in doc_ids]
    client.upsert(
        "val", points=models.Batch(ids=list(range(len(doc_ids))), vectors=vectors.tolist(), payloads=payloads)
    )
    got = {}
    for query_id, vector in zip(data.queries, model.encode_query(list(data.queries.values())), strict=True):
        hits = client.query_points("val", query=vector.tolist(), limit=K, with_payload=True).points
        got[query_id] = [hit.payload["doc_id"] for hit in hits]
    client.close()
    assert_same_top_k(got, runs["full"] / "model", runs["val"])


def adapted_and_base(out: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TEXTS' adapted query vectors, base query vectors and base document vectors, computed without model/: the
    base model, then the trained head as lit_embed's own adapter class (weights from the LlamaIndex files)."""
    from lit_embed.models.adapters import LinearAdapter, MLPAdapter

    base = SentenceTransformer(str(out / "base_model"), device="cpu")
    config = json.loads((out / "llamaindex_adapter" / "config.json").read_text())
    state = torch.load(out / "llamaindex_adapter" / "pytorch_model.bin", weights_only=True)
    if "hidden_features" in config:
        head = MLPAdapter(config["in_features"], config["hidden_features"], config["out_features"])
    else:
        head = LinearAdapter(config["in_features"], config["out_features"], config["bias"])
    head.load_state_dict(state)
    base_q = base.encode_query(TEXTS, convert_to_tensor=True)
    with torch.no_grad():
        adapted = head(base_q)
    assert (adapted - base_q).abs().max() > 1e-3, "the head did not train: the test would compare the base twice"
    return adapted, base_q, base.encode_document(TEXTS, convert_to_tensor=True)


@pytest.mark.parametrize("run_name", ["adapter", "mlp"])
def test_every_client_call_of_an_adapter_model(runs: dict[str, Path], run_name: str) -> None:
    """Which calls map queries (the README's adapter section): the task routes, prompt_name does not."""
    out = runs[run_name]
    adapted, base_q, base_d = adapted_and_base(out)
    model = SentenceTransformer(str(out / "model"), device="cpu")

    def close(a, b) -> None:
        torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), b, atol=1e-5, rtol=1e-4)

    close(model.encode_query(TEXTS, convert_to_tensor=True), adapted)
    close(model.encode(TEXTS, task="query", convert_to_tensor=True), adapted)
    close(model.encode_document(TEXTS, convert_to_tensor=True), base_d)
    close(model.encode(TEXTS, convert_to_tensor=True), base_q)  # no task: the default (document) route
    close(model.encode(TEXTS, prompt_name="query", convert_to_tensor=True), base_q)  # what HuggingFaceEmbedding calls

    hf = HuggingFaceEmbedding(model_name=str(out / "model"), device="cpu")
    close([hf.get_query_embedding(t) for t in TEXTS], base_q)  # documented: unadapted
    close([hf.get_text_embedding(t) for t in TEXTS], base_d)
    adapter_cls = TwoLayerNN if run_name == "mlp" else LinearLayer
    li = AdapterEmbeddingModel(hf, str(out / "llamaindex_adapter"), adapter_cls=adapter_cls, device="cpu")
    close([li.get_query_embedding(t) for t in TEXTS], adapted)
    close([li.get_text_embedding(t) for t in TEXTS], base_d)


def warned_llamaindex_call(text: str) -> str:
    """The AdapterEmbeddingModel(...) expression an adapter export's warning tells the user to write."""
    match = re.search(r"AdapterEmbeddingModel\(HuggingFaceEmbedding\(.*?\), \".*?\", adapter_cls=\w+\)", text)
    assert match, text
    return match.group(0)


def assert_warning_holds(text: str, model_dir: Path, llamaindex_dir: Path, adapter_cls: str, adapted) -> None:
    """The warning names each call, and the LlamaIndex code it gives, run as written, maps queries."""
    for call in ("model.encode_query(texts)", 'model.encode(texts, task="query")', "Plain model.encode(texts)"):
        assert call in text, text
    assert f'HuggingFaceEmbedding(model_name="{model_dir}") alone return the base model\'s query vectors' in text
    code = warned_llamaindex_call(text)
    assert code == (
        f'AdapterEmbeddingModel(HuggingFaceEmbedding(model_name="{model_dir}"), "{llamaindex_dir}", '
        f"adapter_cls={adapter_cls})"
    )
    assert f"from llama_index.embeddings.adapter.utils import {adapter_cls}" in text
    names = {"AdapterEmbeddingModel": AdapterEmbeddingModel, "HuggingFaceEmbedding": HuggingFaceEmbedding}
    embed_model = eval(code, {**names, "LinearLayer": LinearLayer, "TwoLayerNN": TwoLayerNN})
    vectors = torch.tensor([embed_model.get_query_embedding(t) for t in TEXTS])
    torch.testing.assert_close(vectors, adapted, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("run_name", "adapter_cls"), [("adapter", "LinearLayer"), ("mlp", "TwoLayerNN")])
def test_adapter_runs_warn_which_calls_map_queries(runs: dict, run_name: str, adapter_cls: str) -> None:
    out = runs[run_name]
    (message,) = runs["warnings"][run_name]
    adapted, _, _ = adapted_and_base(out)
    assert_warning_holds(message, out / "model", out / "llamaindex_adapter", adapter_cls, adapted)
    assert runs["warnings"]["full"] == runs["warnings"]["prompted"] == []


def test_lit_embed_export_writes_the_llamaindex_adapter_and_warns(runs: dict, tmp_path: Path) -> None:
    from lit_embed.export import main as export_main

    out = runs["mlp"]
    exported = tmp_path / "exported"
    with LoggedWarnings("lit_embed.models.adapted") as logged:
        export_main([str(out / "checkpoints" / "last.ckpt"), str(exported)])
    (message,) = logged.messages
    adapted, _, _ = adapted_and_base(out)
    assert_warning_holds(message, exported, Path(f"{exported}-llamaindex_adapter"), "TwoLayerNN", adapted)


def test_llamaindex_needs_the_runs_prompts(runs: dict[str, Path]) -> None:
    """HuggingFaceEmbedding replaces a model's saved prompts with its own (empty for a local path); passing the
    run's prompts as query_instruction / text_instruction (the README's code) gives encode_query/encode_document."""
    model_dir = runs["prompted"] / "model"
    model = SentenceTransformer(str(model_dir), device="cpu")
    assert model.prompts["query"] == PROMPTS["query"] and model.prompts["document"] == PROMPTS["document"]
    queries = model.encode_query(TEXTS, convert_to_tensor=True)
    documents = model.encode_document(TEXTS, convert_to_tensor=True)

    plain = HuggingFaceEmbedding(model_name=str(model_dir), device="cpu")
    assert (torch.tensor([plain.get_query_embedding(t) for t in TEXTS]) - queries).abs().max() > 1e-3
    assert (torch.tensor([plain.get_text_embedding(t) for t in TEXTS]) - documents).abs().max() > 1e-3

    prompts = json.load(open(model_dir / "config_sentence_transformers.json"))["prompts"]
    embed_model = HuggingFaceEmbedding(
        model_name=str(model_dir),
        query_instruction=prompts.get("query"),
        text_instruction=prompts.get("document"),
        device="cpu",
    )
    given_q = torch.tensor([embed_model.get_query_embedding(t) for t in TEXTS])
    torch.testing.assert_close(given_q, queries, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        torch.tensor(embed_model.get_text_embedding_batch(TEXTS)), documents, atol=1e-5, rtol=1e-4
    )


def test_eval_through_a_qdrant_index_equals_the_exact_evaluation(
    runs: dict[str, Path], tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture
) -> None:
    import lit_embed.evaluation.vector_index as vector_index

    model, val, index = runs["full"] / "model", runs["val"], tmp_path / "index"
    exact = evaluate(model, val, device="cpu")
    embedded = []
    encode_texts = vector_index.encode_texts

    def spy(encoder, texts, kind, *args):
        embedded.append(kind)
        return encode_texts(encoder, texts, kind, *args)

    monkeypatch.setattr(vector_index, "encode_texts", spy)
    eval_main([str(runs["full"]), str(val), "--index", str(index), "--json", "--device", "cpu"])
    captured = capsys.readouterr()
    through_index = json.loads(captured.out)
    assert through_index.keys() == exact.keys()
    for key, value in exact.items():
        assert abs(through_index[key] - value) <= 1e-6, (key, through_index[key], value)
    assert "Built the index" in captured.err and embedded == ["document", "query"]
    manifest = json.loads((index / "index.json").read_text())
    assert manifest["collection"] == "val" and manifest["fingerprint"]["documents"] == 40

    # A second call searches the stored vectors: only the queries are embedded.
    embedded.clear()
    again = evaluate(runs["full"], val, device="cpu", index=index)
    assert again == through_index and embedded == ["query"]
    assert "Reusing the index" in capsys.readouterr().err

    # Another model's vectors are not the ones stored: refused, then rebuilt on request.
    other = runs["prompted"] / "model"
    with pytest.raises(
        LitEmbedError,
        match=r"another model or corpus .*changed: the model's modules, weights, prompt or length limit\.",
    ):
        evaluate(other, val, device="cpu", index=index)
    rebuilt = evaluate(other, val, device="cpu", index=index, rebuild_index=True)
    other_exact = evaluate(other, val, device="cpu")
    assert all(abs(rebuilt[key] - other_exact[key]) <= 1e-6 for key in other_exact)

    # Another corpus (the training file) is refused too.
    with pytest.raises(LitEmbedError, match="changed: the corpus's ids or texts, the number of documents"):
        evaluate(other, val.parent / "train.json", device="cpu", index=index)

    # Local mode locks its folder: a second client gets one message.
    from qdrant_client import QdrantClient

    holder = QdrantClient(path=str(index))
    try:
        with pytest.raises(LitEmbedError, match="already accessed by another instance.* choose another folder"):
            evaluate(other, val, device="cpu", index=index)
    finally:
        holder.close()

    # A build that never wrote index.json (interrupted) is not trusted.
    (index / "index.json").unlink()
    with pytest.raises(LitEmbedError, match="did not finish building"):
        evaluate(other, val, device="cpu", index=index)


def test_eval_index_without_qdrant_names_the_extra(runs: dict[str, Path], tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "qdrant_client", None)  # import qdrant_client raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        eval_main([str(runs["full"]), str(runs["val"]), "--index", str(tmp_path / "index")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "qdrant-client" in err and "pip install 'lit_embed[clients]'" in err and "Traceback" not in err
