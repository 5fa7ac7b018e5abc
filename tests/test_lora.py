"""method=lora: LoRA layers on a frozen encoder start as the base model, only they train and are checkpointed, the
merged model loads without PEFT, the adapter alone loads with it, and a killed run resumes exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, compose_train, tiny_run_overrides, trained_encoders, write_toy_data
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer

from lit_embed.data.formats import load_dataset
from lit_embed.errors import LitEmbedError
from lit_embed.models.encoder import Encoder
from lit_embed.models.lora import LoRA, lora_config, lora_summary, lora_weight_names
from lit_embed.train import run
from lit_embed.training.checkpoint_io import load_checkpoint
from lit_embed.training.module import EmbeddingFinetuneModule

TEXTS = ["how do I parse json number 3?", "sort a list of tuples by key", "def helper_3():\n    return 3"]
# The tiny BERT (2 layers of 64, feed-forward 128): all-linear adapts query, key, value, attention.output.dense,
# intermediate.dense and output.dense of each layer (not the unused pooler): A [16, in] and B [out, 16] each.
LORA_WEIGHTS = 2 * 6 * 2
LORA_PARAMETERS = 2 * (4 * (16 * 64 + 64 * 16) + 2 * (16 * 64 + 128 * 16))
ALL_LINEAR_TARGETS = [
    f"encoder.layer.{i}.{name}"
    for i in range(2)
    for name in (
        "attention.output.dense",
        "attention.self.key",
        "attention.self.query",
        "attention.self.value",
        "intermediate.dense",
        "output.dense",
    )
]


def lora_overrides(train: Path, val: Path, out: Path, *extra: str, **values: object) -> list[str]:
    return [*tiny_run_overrides(train, val, out, **values), "method=lora", *extra]


def test_lora_layers_start_as_the_base_model_and_only_they_train(tiny_model_path: str) -> None:
    base = Encoder(tiny_model_path)
    encoder = LoRA()(Encoder(tiny_model_path))
    assert isinstance(encoder, Encoder)  # the rest of lit_embed sees a plain encoder
    for kind in ("query", "document"):
        assert torch.equal(encoder.encode(TEXTS, kind), base.encode(TEXTS, kind)), kind

    names = lora_weight_names(encoder)
    assert names == {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert len(names) == LORA_WEIGHTS
    assert all(n.endswith(("lora_A.default.weight", "lora_B.default.weight")) for n in names), names
    assert not any("pooler" in n for n in names)  # loaded but unused by sentence-transformers: nothing to train
    assert lora_config(encoder) == {"r": 16, "alpha": 32.0, "dropout": 0.1, "target_modules": ALL_LINEAR_TARGETS}
    assert lora_config(base) is None and lora_weight_names(base) is None
    total = sum(p.numel() for p in base.parameters()) + LORA_PARAMETERS
    share = 100 * LORA_PARAMETERS / total
    assert lora_summary(encoder) == f"lora: {LORA_PARAMETERS:,} of {total:,} parameters train ({share:.2f}%)"


def test_target_modules_and_rank_shape_the_layers(tiny_model_path: str) -> None:
    encoder = LoRA(r=4, alpha=8, dropout=0.0, target_modules=["key", "dense"])(Encoder(tiny_model_path))
    config = lora_config(encoder)
    assert config["target_modules"] == ["dense", "key"] and config["r"] == 4 and config["alpha"] == 8.0
    # "dense" ends 3 linear layers per BERT layer (attention output, intermediate, output) and the pooler.
    adapted = {n.rsplit(".lora_", 1)[0] for n in lora_weight_names(encoder)}
    assert len(adapted) == 2 * 4 + 1
    shapes = {tuple(p.shape) for n, p in encoder.named_parameters() if "lora_A" in n}
    assert shapes == {(4, 64), (4, 128)}
    every = LoRA(target_modules="all-linear")(Encoder(tiny_model_path))
    assert len(lora_weight_names(every)) == 2 * 2 * 6  # q, k, v, attention out, intermediate, out; not the pooler
    peft_choice = LoRA(target_modules=None)(Encoder(tiny_model_path))
    assert lora_config(peft_choice)["target_modules"] == ["query", "value"]  # PEFT's for BERT


def test_lora_weights_train_in_fp32_on_a_bf16_base(tiny_model_path: str) -> None:
    base = Encoder(tiny_model_path, dtype="bfloat16")
    encoder = LoRA()(Encoder(tiny_model_path, dtype="bfloat16"))
    dtypes = {p.requires_grad: p.dtype for p in encoder.parameters()}
    assert dtypes == {True: torch.float32, False: torch.bfloat16}
    assert torch.equal(encoder.encode(TEXTS, "query"), base.encode(TEXTS, "query"))


def test_modules_after_the_transformer_stay_frozen(tiny_model_path: str, tmp_path: Path) -> None:
    from sentence_transformers.base.modules import Dense

    with_dense = SentenceTransformer(modules=[*Encoder(tiny_model_path).model, Dense(64, 32)], device="cpu")
    with_dense.save(str(tmp_path / "dense"))
    encoder = LoRA()(Encoder(str(tmp_path / "dense")))
    assert all(".lora_" in n for n in lora_weight_names(encoder)) and len(lora_weight_names(encoder)) == LORA_WEIGHTS


def toy_run(tmp_path: Path, name: str, *extra: str, **values: object) -> tuple[Path, dict]:
    train, val = write_toy_data(tmp_path)
    out = tmp_path / name
    metrics = run(compose_train([*tiny_run_overrides(train, val, out, **values), *extra]))
    return out, metrics


def test_checkpoints_and_optimizer_hold_only_the_lora_weights(tmp_path: Path, capsys) -> None:
    steps = {"trainer.max_steps": 6, "load_best_model_at_end": "false"}
    full, full_metrics = toy_run(tmp_path, "full", **steps)
    capsys.readouterr()
    out, metrics = toy_run(tmp_path, "lora", "method=lora", **steps)
    total = sum(p.numel() for p in Encoder(str(out / "base_model")).parameters()) + LORA_PARAMETERS
    assert f"lora: {LORA_PARAMETERS:,} of {total:,} parameters train (" in capsys.readouterr().out

    checkpoint = load_checkpoint(out / "checkpoints" / "last.ckpt")
    weights = checkpoint["state_dict"]
    assert len(weights) == LORA_WEIGHTS
    assert all(".lora_A.default." in k or ".lora_B.default." in k for k in weights), sorted(weights)
    assert checkpoint["lora_config"]["target_modules"] == ALL_LINEAR_TARGETS
    assert checkpoint["encoder_config"]["model_name_or_path"] == str(out / "base_model")
    trained_b = [v for k, v in weights.items() if "lora_B" in k]
    assert all(v.abs().max() > 0 for v in trained_b), "B starts at zero and must have trained"
    (optimizer,) = checkpoint["optimizer_states"]
    assert len(optimizer["state"]) == LORA_WEIGHTS
    assert sum(len(group["params"]) for group in optimizer["param_groups"]) == LORA_WEIGHTS
    size, full_size = (p / "checkpoints" / "last.ckpt" for p in (out, full))
    assert size.stat().st_size < full_size.stat().st_size / 50, (size.stat().st_size, full_size.stat().st_size)

    # Step 0 is the base model: the same base metrics as full finetuning of the same model.
    assert metrics["base"] == full_metrics["base"]
    assert metrics["final"]["step"] == 6


def test_merged_model_loads_without_peft_and_the_adapter_with_it(tmp_path: Path, monkeypatch) -> None:
    trained = trained_encoders(monkeypatch)
    out, _ = toy_run(tmp_path, "run", "method=lora", **{"trainer.max_steps": 6, "load_best_model_at_end": "false"})
    (encoder,) = trained
    expected = {kind: encoder.encode(TEXTS, kind) for kind in ("query", "document")}
    base = Encoder(str(out / "base_model"))
    assert (expected["query"] - base.encode(TEXTS, "query")).abs().max() > 1e-4, "the run must have moved the model"

    # model/: a plain sentence-transformers directory, no PEFT files, no PEFT needed.
    assert not (out / "model" / "adapter_config.json").exists()
    assert not any("lora" in k for k in load_file(out / "model" / "model.safetensors"))
    script = (
        "import sys, torch\n"
        "sys.modules['peft'] = None  # import peft fails: the model must load without it\n"
        "from sentence_transformers import SentenceTransformer\n"
        "model = SentenceTransformer(sys.argv[1], device='cpu')\n"
        "texts = sys.argv[3:]\n"
        "out = {'query': model.encode_query(texts, convert_to_tensor=True),\n"
        "       'document': model.encode_document(texts, convert_to_tensor=True)}\n"
        "try:\n"
        "    import peft\n"
        "    out['peft_importable'] = True\n"
        "except ImportError:\n"
        "    out['peft_importable'] = False\n"
        "torch.save(out, sys.argv[2])\n"
    )
    result = tmp_path / "embeddings.pt"
    subprocess.run([sys.executable, "-c", script, str(out / "model"), str(result), *TEXTS], check=True)
    loaded = torch.load(result, weights_only=True)
    assert loaded["peft_importable"] is False
    for kind in ("query", "document"):
        torch.testing.assert_close(loaded[kind], expected[kind], atol=1e-5, rtol=0, msg=kind)

    # lora/: the adapter alone, small, in PEFT's format; sentence-transformers' and PEFT's loaders apply it.
    adapter = out / "lora"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    merged_size = (out / "model" / "model.safetensors").stat().st_size
    assert (adapter / "adapter_model.safetensors").stat().st_size < merged_size / 20
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(out / "base_model") and config["r"] == 16
    with_adapter = SentenceTransformer(str(out / "base_model"), device="cpu")
    with_adapter.load_adapter(str(adapter))
    torch.testing.assert_close(
        with_adapter.encode_query(TEXTS, convert_to_tensor=True), expected["query"], atol=1e-5, rtol=0
    )

    from peft import PeftModel

    with_peft = SentenceTransformer(str(out / "base_model"), device="cpu")
    with_peft[0].model = PeftModel.from_pretrained(with_peft[0].model, str(adapter))
    torch.testing.assert_close(
        with_peft.encode_document(TEXTS, convert_to_tensor=True), expected["document"], atol=1e-5, rtol=0
    )

    # lit-embed-export rebuilds both from the checkpoint alone.
    exported = tmp_path / "exported"
    cmd = [sys.executable, "-m", "lit_embed.export", str(out / "checkpoints" / "last.ckpt"), str(exported)]
    printed = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    assert f"{exported}-lora" in printed
    model = SentenceTransformer(str(exported), device="cpu")
    torch.testing.assert_close(model.encode_query(TEXTS, convert_to_tensor=True), expected["query"], atol=1e-5, rtol=0)
    assert (
        load_file(Path(f"{exported}-lora") / "adapter_model.safetensors").keys()
        == load_file(adapter / "adapter_model.safetensors").keys()
    )


def test_the_best_step_is_exported_from_its_lora_weights(tmp_path: Path, monkeypatch) -> None:
    """load_best_model_at_end reloads an older step's LoRA weights (kept without the optimizer state)."""
    from lit_embed.training.callbacks.ir_eval import IREvaluationCallback

    def on_train_batch_end(self, trainer, pl_module, *args):
        trainer.callback_metrics["val/score"] = torch.tensor(-abs(trainer.global_step - 2.0))  # best at step 2

    monkeypatch.setattr(IREvaluationCallback, "on_train_batch_end", on_train_batch_end)
    settings = {"trainer.max_steps": 5, "checkpoint.save_steps": 1, "checkpoint.monitor": "val/score"}
    out, metrics = toy_run(tmp_path, "run", "method=lora", **settings)
    assert metrics["final"]["step"] == 2
    best = load_checkpoint(out / "checkpoints" / "step=2.ckpt")
    assert best.get("weights_only_best") and len(best["state_dict"]) == LORA_WEIGHTS and "lora_config" in best
    from lit_embed.export import encoder_from_checkpoint

    at_step_2 = encoder_from_checkpoint(out / "checkpoints" / "step=2.ckpt").encode(TEXTS, "query")
    exported = SentenceTransformer(str(out / "model"), device="cpu").encode_query(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(exported, at_step_2, atol=1e-5, rtol=0)
    last = encoder_from_checkpoint(out / "checkpoints" / "last.ckpt").encode(TEXTS, "query")
    assert (last - at_step_2).abs().max() > 1e-5


class SimulatedCrash(RuntimeError):
    pass


def test_a_killed_lora_run_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train, val = write_toy_data(tmp_path)  # 48 pairs / batch 8 = 6 batches per epoch
    settings = {"trainer.max_epochs": 2, "trainer.max_steps": 9, "checkpoint.save_steps": 1, "eval.evaluation_steps": 3}
    straight = run(compose_train(lora_overrides(train, val, tmp_path / "straight", **settings)))

    def on_train_batch_start(self, batch, batch_idx):
        if self.trainer.global_step == 4:
            raise SimulatedCrash("killed after step 4")

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        patch.setattr(EmbeddingFinetuneModule, "on_train_batch_start", on_train_batch_start, raising=False)
        with pytest.raises(SimulatedCrash):
            run(compose_train(lora_overrides(train, val, interrupted, **settings)))
    assert load_checkpoint(interrupted / "checkpoints" / "last.ckpt")["global_step"] == 4
    resumed = run(compose_train(lora_overrides(train, val, interrupted, resume="true", **settings)))

    expected = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")["state_dict"]
    actual = load_checkpoint(interrupted / "checkpoints" / "last.ckpt")["state_dict"]
    assert expected.keys() == actual.keys() and len(expected) == LORA_WEIGHTS
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=0, rtol=0, msg=key)
    assert resumed == straight

    # The LoRA settings shape what trains: a resume with others is refused, naming the change.
    with pytest.raises(LitEmbedError, match=r"lora\.r: 16 -> 8"):
        run(
            compose_train(
                lora_overrides(train, val, interrupted, "lora.r=8", resume="true", overwrite="true", **settings)
            )
        )
    # ... and forced with resume_changed=true, the checkpoint's weights do not fit: one message.
    with pytest.raises(LitEmbedError, match="its weights do not fit this model"):
        forced = {"resume": "true", "overwrite": "true", "resume_changed": "true", **settings}
        run(compose_train(lora_overrides(train, val, interrupted, "lora.r=8", **forced)))


def test_weights_of_another_lora_setup_are_refused(tiny_model_path: str) -> None:
    """Lightning loads a LoRA checkpoint without strictness (the frozen base is not in it), so the module and
    load_encoder_weights check the LoRA weights themselves."""
    from lit_embed.training.checkpoint_io import load_encoder_weights

    rank_4 = LoRA(r=4)(Encoder(tiny_model_path))
    other = {"state_dict": {f"encoder.{k}": v for k, v in rank_4.state_dict().items() if ".lora_" in k}}
    other["state_dict"].pop(next(iter(other["state_dict"])))
    module = EmbeddingFinetuneModule(LoRA()(Encoder(tiny_model_path)))
    assert module.strict_loading is False
    with pytest.raises(LitEmbedError, match="not this run's LoRA weights"):
        module.on_load_checkpoint(other)
    with pytest.raises(LitEmbedError, match="not this model's LoRA weights"):
        load_encoder_weights(module.encoder, other)
    own = {"state_dict": {f"encoder.{k}": v for k, v in module.encoder.state_dict().items() if ".lora_" in k}}
    module.on_load_checkpoint(own)
    load_encoder_weights(module.encoder, own)


def lora_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out / "checkpoints" / "last.ckpt")["state_dict"]


def test_cached_and_matryoshka_losses_train_lora_as_the_plain_loss(tmp_path: Path) -> None:
    """No dropout anywhere, so the runs see the same network: GradCache and a one-size Matryoshka give MNRL's steps."""
    common = {
        "trainer.max_steps": 3,
        "model.model_name_or_path.dropout": 0.0,
        "lora.dropout": 0.0,
        # Adam turns float-rounding differences of near-zero gradients into whole steps; the feed-forward layers'
        # updates have such gradients at step 1, so compare on the attention's query and value.
        "lora.target_modules": "[query,value]",
        "load_best_model_at_end": "false",
        "eval.evaluation_steps": 0,
    }
    runs = {
        "mnrl": [],
        "cached": ["loss=cached_mnrl", "loss.mini_batch_size=3"],
        "matryoshka": ["loss=matryoshka", "loss.dims=[64]"],
    }
    weights = {}
    for name, extra in runs.items():
        out, _ = toy_run(tmp_path, name, "method=lora", *extra, **common)
        weights[name] = lora_weights(out)
        assert len(weights[name]) == 2 * 2 * 2
    for name in ("cached", "matryoshka"):
        for key, value in weights["mnrl"].items():
            torch.testing.assert_close(weights[name][key], value, atol=1e-5, rtol=0, msg=f"{name}: {key}")


def test_lora_on_a_decoder_with_gradient_checkpointing(tmp_path: Path, monkeypatch) -> None:
    """The tiny Qwen3 (last-token pooling, left padding): every linear layer's update trains through recomputed
    layers, and the merged model embeds as the trained one."""
    trained = trained_encoders(monkeypatch)
    values = {"trainer.max_steps": 4, "load_best_model_at_end": "false", "method.gradient_checkpointing": "true"}
    out, _ = toy_run(tmp_path, "decoder", "model=tiny_decoder", "method=lora", **values)
    weights = lora_weights(out)
    projections = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert {k.split(".")[-4] for k in weights} == projections
    assert all(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k), "B starts at zero and must train"
    (encoder,) = trained
    model = SentenceTransformer(str(out / "model"), device="cpu")
    for kind, encode in (("query", model.encode_query), ("document", model.encode_document)):
        torch.testing.assert_close(
            encode(TEXTS, convert_to_tensor=True), encoder.encode(TEXTS, kind), atol=1e-5, rtol=0
        )


def test_gist_guides_lora_with_the_base_model(tmp_path: Path) -> None:
    values = {"trainer.max_steps": 3, "loss.cache_dir": tmp_path / "cache", "load_best_model_at_end": "false"}
    out, metrics = toy_run(tmp_path, "gist", "method=lora", "loss=gist", **values)
    assert metrics["final"]["step"] == 3 and len(lora_weights(out)) == LORA_WEIGHTS


def write_vectors(tmp_path: Path) -> list[str]:
    """Random vectors for every id of the toy files: model=precomputed's input."""
    files = []
    for kind in ("query", "document"):
        ids = []
        for split in ("train.json", "val.json"):
            data = load_dataset(tmp_path / split)
            ids += list(data.queries if kind == "query" else data.corpus)
        np.save(tmp_path / f"{kind}.npy", np.random.default_rng(0).normal(size=(len(ids), 8)).astype("float32"))
        (tmp_path / f"{kind}.json").write_text(json.dumps(ids))
        files.append(str(tmp_path / f"{kind}.npy"))
    return ["model=precomputed", f"model.query_embeddings={files[0]}", f"model.document_embeddings={files[1]}"]


INVALID = [
    (["lora.r=0"], "lora.r=0 is not allowed: a whole number >= 1"),
    (["lora.r=2.5"], "lora.r=2.5 is not allowed"),
    (["lora.alpha=-1"], "lora.alpha=-1 is not allowed: a number > 0"),
    (["lora.dropout=1"], "lora.dropout=1 is not allowed: a probability in [0, 1)"),
    (["lora.target_modules=[]"], "lora.target_modules=[] is not allowed: a list of layer names"),
    (["lora.target_modules=[qkv]"], "'qkv' names none of this model's linear layers"),
    (["lora.target_modules=[query,LayerNorm]"], "'LayerNorm' names none of this model's linear layers. Name some"),
]


@pytest.mark.parametrize(("overrides", "message"), INVALID, ids=[" ".join(o) for o, _ in INVALID])
def test_bad_lora_settings_name_the_key_and_the_fix(tmp_path: Path, overrides: list[str], message: str) -> None:
    train, val = write_toy_data(tmp_path, num_train=16, num_val=4)
    out = tmp_path / "out"
    with pytest.raises(LitEmbedError) as err:
        run(compose_train(lora_overrides(train, val, out, *overrides)))
    assert message in str(err.value)
    assert not (out / "checkpoints").exists() and not (out / "model").exists()
    if "target_modules" not in overrides[0]:  # checked before the model is even loaded
        assert not (out / "base_model").exists()


def test_the_target_modules_message_names_the_layers_there_are(tmp_path: Path) -> None:
    train, val = write_toy_data(tmp_path, num_train=16, num_val=4)
    with pytest.raises(LitEmbedError, match=r"Name some of them \(dense, key, query, value\), or use all-linear"):
        run(compose_train(lora_overrides(train, val, tmp_path / "out", "lora.target_modules=[qkv]")))


def test_lora_on_precomputed_vectors_is_refused(tmp_path: Path) -> None:
    train, val = write_toy_data(tmp_path, num_train=16, num_val=4)
    overrides = lora_overrides(train, val, tmp_path / "out", *write_vectors(tmp_path))
    with pytest.raises(LitEmbedError, match="method=lora adds trainable layers inside a transformer.*method=adapter"):
        run(compose_train(overrides))


def test_lora_without_peft_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train, val = write_toy_data(tmp_path, num_train=16, num_val=4)
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(
        LitEmbedError, match=r"method=lora needs PEFT, which is not installed: pip install 'lit_embed\[lora\]'"
    ):
        run(compose_train(lora_overrides(train, val, tmp_path / "out")))


@pytest.mark.slow
def test_command_line_exits_2_with_one_message(tmp_path: Path) -> None:
    args = ["model=tiny", "trainer=cpu", "method=lora", "lora.r=0", f"output_dir={tmp_path / 'out'}"]
    result = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "lora.r=0 is not allowed: a whole number >= 1" in output
    for noise in ("Traceback", "Error executing job", "Error in call to target"):
        assert noise not in output, output


@pytest.mark.slow
def test_ddp_cpu_lora_run_trains_like_one_process_on_the_global_batch(tmp_path: Path) -> None:
    """``trainer=ddp_cpu`` (2 gloo processes, 8 pairs each, gathered negatives) ends with the LoRA weights of one
    process with batches of 16."""
    train, val = write_toy_data(tmp_path)
    common = {
        "trainer.max_steps": 3,
        "model.model_name_or_path.dropout": 0.0,  # the ranks' dropout masks could not match one process's
        "lora.dropout": 0.0,
        "eval.evaluation_steps": 0,
        "load_best_model_at_end": "false",
    }
    runs = {
        "ddp": ("ddp_cpu", {"loss.gather_across_devices": "true", "data.batch_size": 8}),
        "single": ("cpu", {"data.batch_size": 16}),
    }
    for name, (trainer, extra) in runs.items():
        overrides = lora_overrides(train, val, tmp_path / name, **common, **extra)
        overrides[overrides.index("trainer=cpu")] = f"trainer={trainer}"
        result = subprocess.run(
            [sys.executable, "train.py", *overrides], cwd=REPO, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("lora: ") == 1, result.stdout  # printed by the launching process only
    expected, actual = lora_weights(tmp_path / "single"), lora_weights(tmp_path / "ddp")
    assert expected.keys() == actual.keys() and len(expected) == LORA_WEIGHTS
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, atol=1e-4, rtol=0, msg=key)
    assert (tmp_path / "ddp" / "lora" / "adapter_model.safetensors").is_file()
