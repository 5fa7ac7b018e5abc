"""lit_embed.llamaindex: LlamaIndex's finetuning engines with lit_embed underneath, on the tiny model."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, toy_split, trained_encoders

from lit_embed.data.formats import save_llamaindex_json
from lit_embed.llamaindex import (
    CrossEncoderFinetuneEngine,
    CrossEncoderFinetuningDatasetSample,
    EmbeddingAdapterFinetuneEngine,
    EmbeddingQAFinetuneDataset,
    SentenceTransformersFinetuneEngine,
)

QUERIES = ["how do I sort a list number 3?", "open a file"]
DOCUMENTS = ["def helper_3():\n    # sort a list variant 3\n    return 3", "def close(self):\n    self._file.close()"]


def llamaindex_dataset(n: int, offset: int = 0) -> EmbeddingQAFinetuneDataset:
    split = toy_split(n, offset)
    return EmbeddingQAFinetuneDataset(split.queries, split.corpus, split.relevant_docs)


def run_config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())


@pytest.fixture(scope="module")
def st_engine(tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory) -> SentenceTransformersFinetuneEngine:
    root = tmp_path_factory.mktemp("st")
    engine = SentenceTransformersFinetuneEngine(
        llamaindex_dataset(24),
        model_id=tiny_model_path,
        model_output_path=str(root / "exp_finetune"),
        val_dataset=llamaindex_dataset(10, offset=1000),
        batch_size=6,
        epochs=1,
        evaluation_steps=2,
        show_progress_bar=False,
        device="cpu",
        overrides=["optimizer.lr=1e-3"],
    )
    engine.finetune()
    return engine


@pytest.fixture(scope="module")
def adapter_run(tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory):
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    root = tmp_path_factory.mktemp("adapter")
    engine = EmbeddingAdapterFinetuneEngine(
        llamaindex_dataset(24),
        HuggingFaceEmbedding(model_name=tiny_model_path, device="cpu"),
        batch_size=8,
        epochs=3,
        model_output_path=str(root / "model_output"),
        device="cpu",
        optimizer_params={"lr": 1e-2},
        overrides=[f"method.encoder.cache_dir={root / 'cache'}"],
    )
    with pytest.MonkeyPatch.context() as patch:
        trained = trained_encoders(patch)
        engine.finetune()
    return engine, trained[0]


def test_importing_needs_no_llamaindex_torch_or_lightning() -> None:
    code = (
        "import sys, lit_embed.llamaindex; "
        "print([m for m in ('torch', 'lightning', 'llama_index') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.strip() == "[]"


def test_sentence_transformers_engine_end_to_end(st_engine: SentenceTransformersFinetuneEngine) -> None:
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    from sentence_transformers import SentenceTransformer

    output = Path(st_engine.model_output_path)
    assert (output / "modules.json").is_file()
    assert st_engine.run_dir == output.parent / "exp_finetune-run"
    assert {"train.json", "val.json", "metrics.json", "model"} <= {p.name for p in st_engine.run_dir.iterdir()}
    assert set(st_engine.metrics) == {"base", "finetuned", "final", "merge"}  # lit_embed's merging is on

    embed_model = st_engine.get_finetuned_model()
    assert isinstance(embed_model, HuggingFaceEmbedding)
    model = SentenceTransformer(str(output), device="cpu")
    np.testing.assert_allclose(
        [embed_model.get_query_embedding(q) for q in QUERIES], model.encode_query(QUERIES), atol=1e-5
    )
    np.testing.assert_allclose(
        embed_model.get_text_embedding_batch(DOCUMENTS), model.encode_document(DOCUMENTS), atol=1e-5
    )
    # What is at model_output_path is the run's exported model.
    exported = SentenceTransformer(str(st_engine.run_dir / "model"), device="cpu")
    np.testing.assert_array_equal(exported.encode_query(QUERIES), model.encode_query(QUERIES))


def test_sentence_transformers_arguments_reach_the_config(st_engine: SentenceTransformersFinetuneEngine) -> None:
    cfg = run_config(st_engine.run_dir)
    assert cfg["model"]["model_name_or_path"] == st_engine.model_id
    assert cfg["trainer"]["max_epochs"] == 1 and cfg["trainer"]["accelerator"] == "cpu"
    assert cfg["trainer"]["enable_progress_bar"] is False
    assert cfg["data"]["batch_size"] == 6 and cfg["data"]["use_all_docs"] is False
    assert cfg["data"]["train_path"] == str(st_engine.run_dir / "train.json")
    assert cfg["eval"]["evaluation_steps"] == 2
    assert cfg["output_dir"] == str(st_engine.run_dir) and cfg["optimizer"]["lr"] == 1e-3


def test_without_llamaindex_the_model_path_comes_back(
    st_engine: SentenceTransformersFinetuneEngine, adapter_run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "llama_index.embeddings.huggingface", None)
    monkeypatch.setitem(sys.modules, "llama_index.embeddings.adapter", None)
    assert st_engine.get_finetuned_model() == st_engine.model_output_path
    assert adapter_run[0].get_finetuned_model() == adapter_run[0].model_output_path


def test_adapter_engine_end_to_end(adapter_run) -> None:
    from llama_index.embeddings.adapter import AdapterEmbeddingModel, LinearLayer
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    from sentence_transformers import SentenceTransformer

    engine, trained = adapter_run
    output = Path(engine.model_output_path)
    assert sorted(p.name for p in output.iterdir()) == ["config.json", "pytorch_model.bin"]
    embed_model = engine.get_finetuned_model()
    assert isinstance(embed_model, AdapterEmbeddingModel)
    queries = np.array([embed_model.get_query_embedding(q) for q in QUERIES])
    # The head trained: queries moved away from the base model's vectors.
    base = np.array([engine.embed_model.get_query_embedding(q) for q in QUERIES])
    assert np.abs(queries - base).max() > 1e-3
    # AdapterEmbeddingModel's queries are lit_embed's adapted encoder's and the exported model's encode_query.
    np.testing.assert_allclose(queries, trained.encode(QUERIES, "query").numpy(), atol=1e-5)
    exported = SentenceTransformer(str(engine.run_dir / "model"), device="cpu")
    np.testing.assert_allclose(queries, exported.encode_query(QUERIES), atol=1e-5)
    np.testing.assert_allclose(
        embed_model.get_text_embedding_batch(DOCUMENTS), exported.encode_document(DOCUMENTS), atol=1e-5
    )
    # As LlamaIndex users load an adapter by hand.
    by_hand = AdapterEmbeddingModel(HuggingFaceEmbedding(model_name=engine.embed_model.model_name), str(output))
    np.testing.assert_allclose(by_hand.get_query_embedding(QUERIES[0]), queries[0], atol=1e-5)
    assert isinstance(LinearLayer.load(str(output)), LinearLayer)

    cfg = run_config(engine.run_dir)
    assert cfg["method"]["encoder"]["_target_"] == "lit_embed.models.adapted.AdaptedEncoder"
    assert cfg["adapter"]["_target_"] == "lit_embed.models.adapters.LinearAdapter" and cfg["adapter"]["bias"] is False
    assert cfg["model"]["model_name_or_path"] == engine.embed_model.model_name
    assert cfg["trainer"]["max_epochs"] == 3 and cfg["data"]["batch_size"] == 8 and cfg["optimizer"]["lr"] == 1e-2
    assert cfg["output_dir"] == str(output.parent / "model_output-run")


def test_adapter_on_any_llamaindex_embedding(tmp_path: Path) -> None:
    """A hosted API's embedding: its vectors are computed once and the head trains on them (model=precomputed)."""
    import zlib

    from llama_index.core.base.embeddings.base import BaseEmbedding
    from llama_index.embeddings.adapter import AdapterEmbeddingModel

    class HashEmbedding(BaseEmbedding):  # deterministic vectors of each text, as an API's would be
        def _vector(self, text: str) -> list[float]:
            vector = np.random.default_rng(zlib.crc32(text.encode())).normal(size=16)
            return (vector / np.linalg.norm(vector)).tolist()

        def _get_query_embedding(self, query: str) -> list[float]:
            return self._vector("query: " + query)

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return self._get_query_embedding(query)

        def _get_text_embedding(self, text: str) -> list[float]:
            return self._vector(text)

    api = HashEmbedding(model_name="hash")
    val = tmp_path / "val.json"
    save_llamaindex_json(toy_split(8, offset=1000), val)
    engine = EmbeddingAdapterFinetuneEngine(
        llamaindex_dataset(24),
        api,
        epochs=5,
        model_output_path=str(tmp_path / "adapter"),
        device="cpu",
        val_dataset=str(val),
        optimizer_params={"lr": 1e-2},
        overrides=["method.encoder.cache_dir=null"],
    )
    assert "model=precomputed" in engine.overrides
    engine.finetune()
    ids = json.loads((engine.run_dir / "query_embeddings.json").read_text())
    assert len(ids) == 24 + 8 and "q1000" in ids
    embed_model = engine.get_finetuned_model()
    assert isinstance(embed_model, AdapterEmbeddingModel)
    weight = torch.load(tmp_path / "adapter" / "pytorch_model.bin", weights_only=True)["linear.weight"].numpy()
    assert np.abs(weight - np.eye(16)).max() > 1e-3  # it trained
    for query in QUERIES:
        np.testing.assert_allclose(
            embed_model.get_query_embedding(query), weight @ np.array(api.get_query_embedding(query)), atol=1e-5
        )
    assert embed_model.get_text_embedding(DOCUMENTS[0]) == api.get_text_embedding(DOCUMENTS[0])
    assert set(engine.metrics) == {"base", "finetuned", "final", "merge"}


def test_qa_dataset_and_path_inputs(tiny_model_path: str, tmp_path: Path) -> None:
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    from sentence_transformers import SentenceTransformer

    val = tmp_path / "val.json"
    save_llamaindex_json(toy_split(8, offset=1000), val)
    arguments = {
        "model_id": tiny_model_path,
        "model_output_path": str(tmp_path / "out"),
        "val_dataset": str(val),  # a file
        "epochs": 1,
        "batch_size": 8,
        "show_progress_bar": False,
        "device": "cpu",
        "run_dir": tmp_path / "runs" / "st",
        "overrides": ["model.query_prompt='query: '", "model.document_prompt='passage: '"],
    }
    engine = SentenceTransformersFinetuneEngine(toy_split(16), **arguments)  # lit_embed's QADataset
    engine.finetune()
    # A model trained with prompts: LlamaIndex's embedding of it uses them as its instructions.
    model = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert model.prompts["query"] == "query: " and model.prompts["document"] == "passage: "
    embed_model = engine.get_finetuned_model()
    np.testing.assert_allclose(embed_model.get_query_embedding(QUERIES[0]), model.encode_query(QUERIES[0]), atol=1e-5)
    np.testing.assert_allclose(
        embed_model.get_text_embedding(DOCUMENTS[0]), model.encode_document(DOCUMENTS[0]), atol=1e-5
    )
    assert not np.allclose(embed_model.get_query_embedding(QUERIES[0]), model.encode(QUERIES[0]), atol=1e-4)
    overrides = yaml.safe_load((tmp_path / "runs" / "st" / ".hydra" / "overrides.yaml").read_text())
    assert "resume=true" not in overrides
    assert isinstance(engine.get_finetuned_model(), HuggingFaceEmbedding)
    cfg = run_config(tmp_path / "runs" / "st")
    assert cfg["data"]["val_path"] == str(val) and not (tmp_path / "runs" / "st" / "val.json").exists()
    assert cfg["trainer"]["max_epochs"] == 1 and cfg["data"]["batch_size"] == 8
    assert (tmp_path / "out" / "modules.json").is_file() and not (tmp_path / "out-run").exists()

    # resume_from_checkpoint continues from the run folder's last.ckpt once there is one.
    SentenceTransformersFinetuneEngine(toy_split(16), resume_from_checkpoint=True, **arguments).finetune()
    overrides = yaml.safe_load((tmp_path / "runs" / "st" / ".hydra" / "overrides.yaml").read_text())
    assert overrides[-1] == "resume=true"


def test_unknown_arguments_raise_as_python_does(tiny_model_path: str) -> None:
    dataset = llamaindex_dataset(4)
    with pytest.raises(TypeError, match="unexpected keyword argument 'learning_rate'"):
        SentenceTransformersFinetuneEngine(dataset, model_id=tiny_model_path, learning_rate=1e-3)
    with pytest.raises(TypeError, match="EmbeddingAdapterFinetuneEngine.. got an unexpected keyword argument 'lr'"):
        EmbeddingAdapterFinetuneEngine(dataset, tiny_model_path, lr=1e-3)
    with pytest.raises(TypeError, match="EmbeddingQAFinetuneDataset, a QADataset or a file path"):
        SentenceTransformersFinetuneEngine({"queries": {}}, model_id=tiny_model_path)


def test_adapter_models_map_to_lit_embed_heads(tiny_model_path: str) -> None:
    from llama_index.embeddings.adapter.utils import LinearLayer, TwoLayerNN

    dataset = llamaindex_dataset(4)
    two_layer = TwoLayerNN(64, 32, 64, bias=True, activation_fn_str="tanh", add_residual=True)
    engine = EmbeddingAdapterFinetuneEngine(dataset, tiny_model_path, adapter_model=two_layer)
    assert {"adapter=mlp", "adapter.hidden_dim=32", "adapter.activation='tanh'", "adapter.residual=true"} <= set(
        engine.overrides
    )
    assert engine.adapter_cls_name == "TwoLayerNN"
    engine = EmbeddingAdapterFinetuneEngine(dataset, tiny_model_path, adapter_model=LinearLayer(64, 64, bias=True))
    assert {"adapter=linear", "adapter.bias=true"} <= set(engine.overrides)

    with pytest.raises(ValueError, match="must keep the embedding size"):
        EmbeddingAdapterFinetuneEngine(dataset, tiny_model_path, adapter_model=TwoLayerNN(64, 32, 16))
    trained = LinearLayer(64, 64)
    with torch.no_grad():
        trained.linear.weight.mul_(2)
    with pytest.raises(ValueError, match="has trained weights"):
        EmbeddingAdapterFinetuneEngine(dataset, tiny_model_path, adapter_model=trained)
    with pytest.raises(TypeError, match="HuggingFaceEmbedding"):
        EmbeddingAdapterFinetuneEngine(dataset, object())


def test_other_arguments_map(tiny_model_path: str, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer, losses

    model = SentenceTransformer(tiny_model_path, device="cpu")
    cached = losses.CachedMultipleNegativesRankingLoss(model, scale=30.0, mini_batch_size=4)
    engine = SentenceTransformersFinetuneEngine(
        llamaindex_dataset(4),
        model_id=tiny_model_path,
        model_output_path=str(tmp_path / "m"),
        loss=cached,
        device="cuda:1",
        use_all_docs=True,
        trust_remote_code=True,
        save_checkpoints=True,
        checkpoint_save_steps=20,
        checkpoint_save_total_limit=2,
    )
    expected = {
        "loss=cached_mnrl",
        "loss.loss.scale=30.0",
        "loss.mini_batch_size=4",
        "trainer.accelerator=gpu",
        "trainer.devices=[1]",
        "data.use_all_docs=true",
        "model.trust_remote_code=true",
        "checkpoint.save_steps=20",
        "checkpoint.save_total_limit=2",
        "data.val_path=null",
        "checkpoint.monitor=null",
    }
    assert expected <= set(engine.overrides)
    mnrl = SentenceTransformersFinetuneEngine(
        llamaindex_dataset(4), loss=losses.MultipleNegativesRankingLoss(model, scale=25.0), device="cpu"
    )
    assert {"loss=mnrl", "loss.scale=25.0", "trainer=cpu"} <= set(mnrl.overrides)
    with pytest.raises(ValueError, match="no lit_embed counterpart"):
        SentenceTransformersFinetuneEngine(llamaindex_dataset(4), loss=losses.CoSENTLoss(model))
    with pytest.raises(ValueError, match="run_dir"):
        SentenceTransformersFinetuneEngine(
            llamaindex_dataset(4), model_output_path=str(tmp_path / "m"), run_dir=tmp_path
        )


def test_dataset_json_round_trip(tmp_path: Path) -> None:
    dataset = llamaindex_dataset(3)
    dataset.save_json(tmp_path / "d.json")
    assert EmbeddingQAFinetuneDataset.from_json(tmp_path / "d.json") == dataset
    assert dataset.query_docid_pairs[0] == (dataset.queries["q0"], ["d0"])


@pytest.mark.slow
def test_llamaindex_guide_runs_with_one_import_changed(tiny_model_path: str, tmp_path: Path) -> None:
    script = REPO / "examples" / "llamaindex_guide.py"
    # The guide's code with one import changed: lit_embed appears in that import only.
    tree = ast.parse(script.read_text())
    imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    ours = [node for node in imports if "lit_embed" in ast.unparse(node)]
    assert [ast.unparse(node) for node in ours] == [
        "from lit_embed.llamaindex import EmbeddingAdapterFinetuneEngine, EmbeddingQAFinetuneDataset, "
        "SentenceTransformersFinetuneEngine"
    ]
    code = script.read_text().splitlines()[tree.body[0].end_lineno :]  # after the docstring
    assert sum("lit_embed" in line for line in code) == 1
    save_llamaindex_json(toy_split(24), tmp_path / "train_dataset.json")
    save_llamaindex_json(toy_split(10, offset=1000), tmp_path / "val_dataset.json")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "GUIDE_MODEL_ID": tiny_model_path,
        "GUIDE_EPOCHS": "1",
        "HOME": str(tmp_path / "home"),  # the adapter's embedding cache
    }
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("finetuned", "ft", "ft_2layer"):
        assert any(line.split()[1:2] == [name] for line in result.stdout.splitlines()), name
    assert (tmp_path / "test_model" / "modules.json").is_file()
    assert (tmp_path / "model_output_test" / "pytorch_model.bin").is_file()
    assert (tmp_path / "model5_output_test" / "config.json").is_file()


def test_the_engine_trains_as_llamaindex_does_not_with_the_default_recipe(tiny_model_path: str, tmp_path: Path) -> None:
    # LlamaIndex's engine trains at sentence-transformers' lr 2e-5 on every pair when it has no validation data;
    # lit_embed's recipe and held-out slice would be another training.
    engine = SentenceTransformersFinetuneEngine(
        llamaindex_dataset(24), model_id=tiny_model_path, model_output_path=str(tmp_path / "out"), device="cpu"
    )
    assert "optimizer.lr=2e-05" in engine.overrides and "data.val_fraction=0" in engine.overrides
    assert "trainer.max_epochs=2" in engine.overrides and "data.batch_size=10" in engine.overrides


def cross_encoder_samples(n: int, offset: int = 0) -> list[CrossEncoderFinetuningDatasetSample]:
    """LlamaIndex's samples: each question with its context (score 1) and two others (score 0)."""
    split = toy_split(n, offset)
    contexts = list(split.corpus.values())
    samples = []
    for i, (qid, query) in enumerate(split.queries.items()):
        samples.append(CrossEncoderFinetuningDatasetSample(query, split.corpus[split.relevant_docs[qid][0]], 1))
        samples += [CrossEncoderFinetuningDatasetSample(query, contexts[(i + k) % n], 0) for k in (1, 2)]
    return samples


def test_the_cross_encoder_engine_trains_a_reranker_on_llamaindex_samples(
    tiny_model_path: str, tmp_path: Path, tiny_cross_encoder_path: str
) -> None:
    from llama_index.core.postprocessor import SentenceTransformerRerank
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from sentence_transformers import CrossEncoder

    engine = CrossEncoderFinetuneEngine(
        cross_encoder_samples(24),
        model_id=tiny_cross_encoder_path,
        model_output_path=str(tmp_path / "exp_finetune"),
        val_dataset=cross_encoder_samples(10, offset=1000),
        batch_size=6,
        epochs=1,
        evaluation_steps=2,
        show_progress_bar=False,
        retriever=tiny_model_path,
        device="cpu",
        overrides=["optimizer.lr=1e-3", "rerank.top_k=8"],
    )
    engine.finetune()
    run_dir = tmp_path / "exp_finetune-run"
    config = run_config(run_dir)
    assert config["data"]["batch_size"] == 6 and config["trainer"]["max_epochs"] == 1
    # Each question's contexts scored 0 are its negatives (no mining needed), its context scored 1 the positive.
    rows = [json.loads(line) for line in (run_dir / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(len(row["negatives"]) == 2 for row in rows)
    assert engine.metrics["fusion"]["retriever"] == tiny_model_path
    model = CrossEncoder(str(tmp_path / "exp_finetune"))  # a plain CrossEncoder
    postprocessor = engine.get_finetuned_model(top_n=2)
    assert isinstance(postprocessor, SentenceTransformerRerank) and postprocessor.top_n == 2
    texts = ["def helper_3():\n    # sort variant 3\n    return 3", "def close(self): pass", "x = 1"]
    nodes = [NodeWithScore(node=TextNode(text=text), score=0.5) for text in texts]
    kept = postprocessor.postprocess_nodes(nodes, QueryBundle("how do I sort number 3?"))
    scores = model.predict([("how do I sort number 3?", text) for text in texts])
    assert [node.node.text for node in kept] == [texts[i] for i in np.argsort(-scores)[:2]]


def test_cross_encoder_samples_without_a_relevant_context_are_refused(tmp_path: Path) -> None:
    samples = [CrossEncoderFinetuningDatasetSample("q", "c", 0)]
    with pytest.raises(ValueError, match="dataset: no sample has score 1"):
        CrossEncoderFinetuneEngine(samples, model_output_path=str(tmp_path / "out"))
    with pytest.raises(TypeError, match=r"dataset\[0\] is a str, not a CrossEncoderFinetuningDatasetSample"):
        CrossEncoderFinetuneEngine(["q"], model_output_path=str(tmp_path / "out"))


@pytest.mark.slow
def test_llamaindex_cross_encoder_guide_runs_with_one_import_changed(
    tiny_model_path: str, tiny_cross_encoder_path: str, tmp_path: Path
) -> None:
    script = REPO / "examples" / "llamaindex_cross_encoder_guide.py"
    tree = ast.parse(script.read_text())
    ours = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and "lit_embed" in ast.unparse(node)]
    assert [ast.unparse(node) for node in ours] == [
        "from lit_embed.llamaindex import CrossEncoderFinetuneEngine, CrossEncoderFinetuningDatasetSample"
    ]
    import pandas as pd

    samples = cross_encoder_samples(24)
    pd.DataFrame([vars(sample) for sample in samples]).to_csv(tmp_path / "fine_tuning.csv")
    split = toy_split(60, offset=1000)  # one "paper" long enough for several 256-token nodes, 8 of its questions
    paper = "\n\n".join(split.corpus.values())
    questions = list(split.queries.values())[:8]
    contexts = [split.corpus[split.relevant_docs[qid][0]] for qid in list(split.queries)[:8]]
    pd.DataFrame([{"paper": paper, "questions": repr(questions), "context": repr(contexts)}]).to_csv(
        tmp_path / "reranking_test.csv"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "GUIDE_MODEL_ID": tiny_cross_encoder_path,
        "GUIDE_EMBED_MODEL": tiny_model_path,
        "GUIDE_EPOCHS": "1",
        "HOME": str(tmp_path / "home"),
    }
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    header, values = result.stdout.splitlines()[-2:]
    assert header.split() == ["Metric", "Embeddings", "Base_cross_encoder", "Finetuned_cross_encoder"] + [
        "Total",
        "Relevant",
        "Context",
    ]
    assert values.split()[-1] == "8"
    assert (tmp_path / "exp_finetune" / "modules.json").is_file()
