"""Every throughput switch leaves the loss and the gradients as they were (within bf16/fp32 tolerance)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, compose_train, tiny_run_overrides, write_toy_data
from safetensors.torch import load_file
from test_cached_loss import collated_batch, gradients

from lit_embed.batch import Embedded, padding_groups
from lit_embed.config import build
from lit_embed.data.datamodule import QAPairDataModule
from lit_embed.losses.mnrl import mnrl
from lit_embed.models.encoder import Encoder
from lit_embed.training.module import EmbeddingFinetuneModule
from lit_embed.training.optim import DEFAULT_OPTIMIZER


def loss_and_gradients(encoder: Encoder, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    encoder.zero_grad()
    loss = mnrl(Embedded(encoder(batch.queries), encoder(batch.documents)))
    loss.backward()
    return loss.detach().float(), gradients(encoder)


def test_bf16_autocast_keeps_the_loss_and_gradients_within_bf16_precision(tiny_encoder: Encoder) -> None:
    tiny_encoder.eval()
    batch = collated_batch(tiny_encoder, negatives=1)
    loss32, grads32 = loss_and_gradients(tiny_encoder, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, grads16 = loss_and_gradients(tiny_encoder, batch)
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
    flat32 = torch.cat([g.flatten() for g in grads32.values()])
    flat16 = torch.cat([grads16[name].flatten() for name in grads32])
    assert torch.nn.functional.cosine_similarity(flat16, flat32, dim=0) > 0.999
    largest = max(g.norm() for g in grads32.values())
    for name, grad in grads32.items():
        if grad.norm() > 1e-3 * largest:  # the key biases' true gradient is zero: only noise to compare there
            assert torch.nn.functional.cosine_similarity(grads16[name].flatten(), grad.flatten(), dim=0) > 0.98, name


def count_fused_adamw_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of torch's fused AdamW kernel (torch.optim looks it up on ``torch`` at every step)."""
    calls: list[int] = []
    kernel = torch._fused_adamw_

    def counting(params, *args, **kwargs):
        calls.append(len(params))
        return kernel(params, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", counting)
    return calls


def test_fused_adamw_takes_the_same_step(tiny_encoder: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    module = EmbeddingFinetuneModule(tiny_encoder)
    batch = collated_batch(tiny_encoder, negatives=1)
    loss_and_gradients(tiny_encoder, batch)
    start = {name: p.detach().clone() for name, p in module.named_parameters()}
    after = {}
    for fused in (False, True):
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(start[name])
        optimizer = torch.optim.AdamW(module._param_groups(), lr=1e-3, weight_decay=0.01, fused=fused)
        assert optimizer.defaults["fused"] is fused
        kernel_calls = count_fused_adamw_calls(monkeypatch)
        for _ in range(3):
            optimizer.step()
        # fused=True runs torch's one-kernel AdamW (per parameter group) each step; fused=False never does.
        assert (len(kernel_calls) >= 3) if fused else (kernel_calls == []), (fused, len(kernel_calls))
        if fused:  # the kernel saw every weight that has a gradient, in one call per group and step
            assert sum(kernel_calls) == 3 * sum(p.grad is not None for p in module.parameters())
        after[fused] = {name: p.detach().clone() for name, p in module.named_parameters()}
    assert any(not torch.equal(after[True][n], start[n]) for n in start)
    for name in start:
        torch.testing.assert_close(after[True][name], after[False][name], atol=1e-6, rtol=1e-5, msg=name)


def test_the_default_optimizer_is_fused_adamw(tiny_encoder: Encoder) -> None:
    module = EmbeddingFinetuneModule(tiny_encoder, scheduler=None)  # the module's default optimizer
    from_module = module.configure_optimizers()["optimizer"]
    from_config = build(compose_train(["optimizer.lr=2e-5"]).optimizer)  # conf/train.yaml's, the recipe's lr set
    from_config = from_config(module._param_groups())
    for optimizer in (from_module, from_config, DEFAULT_OPTIMIZER(module._param_groups())):
        assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
        assert optimizer.defaults["lr"] == 2e-5 and optimizer.defaults["weight_decay"] == 0.01
        # Biases and LayerNorm weights are not decayed; every trainable weight is in exactly one group.
        decay, no_decay = optimizer.param_groups
        assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01
        assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
        grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
        assert sorted(grouped) == sorted(id(p) for p in module.parameters() if p.requires_grad)
    unfused = build(compose_train(["optimizer.fused=false", "optimizer.lr=2e-5"]).optimizer)
    assert unfused(module._param_groups()).defaults["fused"] is False


def test_pinned_batches_are_the_same_batches(tiny_encoder: Encoder, tmp_path: Path) -> None:
    from helpers import write_toy_data

    train, _ = write_toy_data(tmp_path)
    batches = {}
    for pin in (False, True):
        data = QAPairDataModule(train_path=str(train), batch_size=8, pin_memory=pin)
        data.tokenize(tiny_encoder)
        loader = data.train_dataloader()
        assert loader.pin_memory == (pin and torch.cuda.is_available())
        batches[pin] = [batch.queries.input_ids for batch in loader]
        if loader.pin_memory:  # on a GPU machine: the batches really are page-locked
            assert all(ids.is_pinned() for ids in batches[pin])
    assert all(torch.equal(a, b) for a, b in zip(batches[False], batches[True], strict=True))
    assert len(batches[True]) == 6 and all(ids.shape[0] >= 1 for ids in batches[True])  # 48 pairs, batches of 8


def test_pin_memory_setting_reaches_the_dataloader(
    tiny_encoder: Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config's data.pin_memory (default true) is what the DataLoader gets when a GPU is there."""
    train, _ = write_toy_data(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the loader is only built, never iterated
    for extra, expected in (([], True), (["data.pin_memory=false"], False)):
        data = build(compose_train(tiny_run_overrides(train, None, tmp_path / "run") + extra).data, "data")
        assert data.batch_settings.pin_memory is expected
        data.tokenize(tiny_encoder)
        assert data.train_dataloader().pin_memory is expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (
        data.train_dataloader().pin_memory is False
        and QAPairDataModule(train_path=str(train)).batch_settings.pin_memory is True
    )


def test_compile_setting_reaches_the_transformer(tiny_model_path: str, tmp_path: Path) -> None:
    """method.compile=true compiles the Hugging Face model in place (compilation itself waits for the first call),
    the one that padded and packed batches both run."""
    assert Encoder(tiny_model_path).model[0].auto_model._compiled_call_impl is None
    for value in (True, False):
        cfg = compose_train(
            tiny_run_overrides(tmp_path / "t.json", None, tmp_path / "run", **{"method.compile": value})
        )
        module = build(cfg.method, "method", encoder=build(cfg.model, "model"))
        compiled = module.encoder
        assert (compiled.model[0].auto_model._compiled_call_impl is not None) is value
        assert all(module._compiled_call_impl is None for module in list(compiled.model)[1:])  # pooling stays eager
        assert "compile" not in compiled.config  # a training switch: the encoder rebuilt for export is plain


def padded_tokens(side) -> tuple[int, int]:
    """(tokens fed to the encoder, real tokens) of one side of a batch, padded by the encoder in its length groups."""
    lengths = sorted(side.lengths)
    groups = padding_groups(lengths, side.length_groups)
    return sum((end - start) * lengths[end - 1] for start, end in groups), sum(lengths)


def test_length_groups_pad_less_and_keep_the_loss_and_gradients(tiny_encoder: Encoder, monkeypatch) -> None:
    tiny_encoder.eval()  # no dropout: the passes must be comparable
    one = collated_batch(tiny_encoder, size=16, negatives=1, length_groups=1)
    grouped = collated_batch(tiny_encoder, size=16, negatives=1, length_groups=4)
    fed_widths: list[tuple[int, int]] = []  # what the encoder's padded forward gets
    embed_features = Encoder.embed_features
    monkeypatch.setattr(
        Encoder, "embed_features", lambda self, f: fed_widths.append(f["input_ids"].shape) or embed_features(self, f)
    )
    for side in ("queries", "documents"):
        a, b = getattr(one, side), getattr(grouped, side)
        assert torch.equal(a.input_ids, b.input_ids) and a.lengths == b.lengths, f"{side}: the same texts, same order"
        (fed_one, real_one), (fed_grouped, real_grouped) = padded_tokens(a), padded_tokens(b)
        assert real_grouped == real_one and fed_grouped <= fed_one
    fed = {
        n: sum(padded_tokens(getattr(b, s))[0] for s in ("queries", "documents"))
        for n, b in (("1", one), ("4", grouped))
    }
    real = sum(padded_tokens(getattr(one, s))[1] for s in ("queries", "documents"))
    assert fed["4"] < fed["1"], "length groups feed fewer padded tokens"
    assert fed["4"] - real < 0.8 * (fed["1"] - real), fed  # and save a real share of the padding
    expected = loss_and_gradients(tiny_encoder, one)
    assert sum(rows * width for rows, width in fed_widths) == fed["1"]  # the encoder pads as counted
    fed_widths.clear()
    got = loss_and_gradients(tiny_encoder, grouped)
    assert sum(rows * width for rows, width in fed_widths) == fed["4"] and len(fed_widths) > 2
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=0)
    assert set(got[1]) == set(expected[1])
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_compiled_encoder_gives_the_same_loss_and_gradients(tiny_model_path: str) -> None:
    eager, compiled = Encoder(tiny_model_path), Encoder(tiny_model_path)
    compiled.compile_transformer()
    eager.eval(), compiled.eval()
    batch = collated_batch(eager, negatives=1)
    assert compiled.model[0].auto_model._compiled_call_impl is not None
    expected, got = loss_and_gradients(eager, batch), loss_and_gradients(compiled, batch)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=0)
    assert list(compiled.state_dict()) == list(eager.state_dict()), "compiling renamed the weights"
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


ROW = re.compile(
    r"^\| (sentence-transformers|lit_embed) \| ([\d.]+) \| ([\d.]+) GiB \| ([\d.]+)% \| ([\d.]+|-) \| "
    r"([\d.]+) \| (\d+) \| ([\d.]+) \| (\d+) \|$",
    re.M,
)


@pytest.mark.parametrize(
    "extra",
    # 128 pairs: 8 steps an epoch, so the profiled steps 3 and 4 hold no epoch's end or start
    [
        ["--num-pairs", "128"],
        pytest.param(["--cached", "4", "--num-pairs", "128", "--no-evaluate"], marks=pytest.mark.slow),
    ],
    ids=["plain", "cached"],
)
def test_throughput_benchmark_runs_and_prints_the_ratio(tmp_path: Path, extra: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--model", "tiny", "--batch-size", "16", "--steps", "5"]
        + ["--warmup", "1", "--rounds", "1", "--json", str(tmp_path / "result.json"), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lit_embed / sentence-transformers:" in result.stdout
    assert "| sentence-transformers |" in result.stdout and "| lit_embed |" in result.stdout
    assert (tmp_path / "result.json").is_file()

    # The table: one row per system, positive pairs/s, memory and MFU, and an MRR@10 in [0, 1] when evaluated.
    rows = {m[0]: m[1:] for m in ROW.findall(result.stdout)}
    assert set(rows) == {"sentence-transformers", "lit_embed"}, result.stdout
    rates = {system: float(row[0]) for system, row in rows.items()}
    evaluated = "--no-evaluate" not in extra
    for system, (rate, memory, mfu, mrr, overhead, forwards, _reads, launches) in rows.items():
        assert float(rate) > 0 and float(memory) > 0 and float(mfu) > 0, (system, rows[system])
        # Hardware-independent figures: padding overhead >= 1, at least one forward pass, operators run.
        assert float(overhead) >= 1 and int(forwards) >= 1 and int(launches) > 0, (system, rows[system])
        if evaluated:
            assert 0 <= float(mrr) <= 1, (system, mrr)
        else:
            assert mrr == "-"
    # lit_embed's packed batches compute no padding, and its step reads nothing on the host that sentence-transformers'
    # does not (Lightning's logging, once per log step, and the epoch's end are outside the steps measured).
    assert float(rows["lit_embed"][4]) <= 1.02 and float(rows["sentence-transformers"][4]) > 1.02
    assert float(rows["lit_embed"][6]) < 1 <= float(rows["sentence-transformers"][6])
    # The printed ratio is lit_embed's pairs/s over sentence-transformers' from that same table (up to the rounding
    # of the table's one decimal and the ratio's two).
    printed = float(re.search(r"lit_embed / sentence-transformers: ([\d.]+)x pairs/s", result.stdout)[1])
    lit, st = rates["lit_embed"], rates["sentence-transformers"]
    assert (lit - 0.05) / (st + 0.05) - 0.005 <= printed <= (lit + 0.05) / (st - 0.05) + 0.005, (printed, lit, st)
    # lit_embed packs this model: no padding computed, queries and documents in one forward pass.
    assert float(rows["lit_embed"][4]) == 1.0 and float(rows["sentence-transformers"][4]) > 1.0
    if "--cached" not in extra:
        assert int(rows["lit_embed"][5]) == 1 and int(rows["sentence-transformers"][5]) == 2

    # The JSON holds the unrounded numbers the table and the ratio were printed from.
    data = json.loads((tmp_path / "result.json").read_text())
    lit_json, st_json = data["lit_embed"]["pairs_per_second"], data["sentence-transformers"]["pairs_per_second"]
    assert lit_json > 0 and st_json > 0
    assert data["ratio"] == pytest.approx(lit_json / st_json, rel=1e-12)
    assert f"{data['ratio']:.2f}" == f"{printed:.2f}"
    for system in rows:
        assert f"{data[system]['pairs_per_second']:.1f}" == rows[system][0]
        assert f"{data[system]['peak_memory_gib']:.2f}" == rows[system][1]
        mrrs = data[system]["mrr@10"]
        assert len(mrrs) == (1 if evaluated else 0) and all(0 <= m <= 1 for m in mrrs)
        if evaluated:
            assert f"{mrrs[0]:.4f}" == rows[system][3]
    assert data["args"]["cached"] == (4 if "--cached" in extra else None) and data["args"]["num_pairs"] == 128
    if "--cached" in extra:
        assert "cached losses, mini-batches of 4" in result.stdout


def test_bf16_run_with_fused_adamw_clips_and_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's mixed-precision plugin refuses to clip for a fused optimizer; bf16 needs no refusal."""
    from lit_embed.train import run

    # Spies on what the run really does: its autocast, its optimizer, the fused kernel and the clipping.
    seen: dict[str, list] = {"autocast": [], "optimizers": [], "clipped": []}
    kernel_calls = count_fused_adamw_calls(monkeypatch)
    training_step, configure_optimizers = (
        EmbeddingFinetuneModule.training_step,
        EmbeddingFinetuneModule.configure_optimizers,
    )
    clip = torch.nn.utils.clip_grad_norm_

    def spy_step(self, *args, **kwargs):
        seen["autocast"].append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return training_step(self, *args, **kwargs)

    def spy_optimizers(self):
        configured = configure_optimizers(self)
        seen["optimizers"].append(configured["optimizer"])
        return configured

    def spy_clip(params, max_norm, *args, **kwargs):
        params = list(params)
        before = clip(params, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        seen["clipped"].append((max_norm, float(before), float(after)))
        return before

    monkeypatch.setattr(EmbeddingFinetuneModule, "training_step", spy_step)
    monkeypatch.setattr(EmbeddingFinetuneModule, "configure_optimizers", spy_optimizers)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy_clip)

    train, val = write_toy_data(tmp_path)
    settings = {"trainer.precision": "bf16-mixed", "optimizer.fused": "true", "trainer.gradient_clip_val": 1.0}
    settings["load_best_model_at_end"] = "false"  # the toy data's base model already ranks perfectly: keep step 4
    metrics = run(compose_train(tiny_run_overrides(train, val, tmp_path / "run", **settings)))
    assert metrics["final"]["step"] >= 0 and (tmp_path / "run" / "model").is_dir()

    assert metrics["final"]["step"] == 4  # trainer.max_steps=4: the last step's model, none skipped
    for name in ("base", "final"):
        assert all(0 <= metrics[name][k] <= 1 for k in ("mrr@10", "ndcg@10")), metrics[name]
    assert seen["autocast"] == [(True, torch.bfloat16)] * 4, "each training step ran under bf16 autocast"
    (optimizer,) = seen["optimizers"]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
    assert len(kernel_calls) >= 4, "the fused AdamW kernel ran at every step"
    steps = [float(state["step"]) for state in optimizer.state.values()]
    assert len(steps) > 10 and set(steps) == {4.0}, "every trained weight took 4 optimizer steps"
    # The gradients were clipped at every step, to the configured norm.
    assert len(seen["clipped"]) == 4 and all(max_norm == 1.0 for max_norm, _, _ in seen["clipped"])
    assert all(after <= 1.0 + 1e-3 and after <= before + 1e-6 for _, before, after in seen["clipped"])
    # The exported model holds trained (and finite) weights, not the base model's.
    trained = load_file(tmp_path / "run" / "model" / "model.safetensors")
    base = load_file(tmp_path / "run" / "base_model" / "model.safetensors")
    assert set(trained) == set(base)
    assert all(torch.isfinite(w).all() for w in trained.values())
    assert any(not torch.equal(trained[name], base[name]) for name in base)


def test_bf16_gradients_are_clipped_directly(tiny_encoder: Encoder) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import MixedPrecision

    module = EmbeddingFinetuneModule(tiny_encoder)
    module._trainer = SimpleNamespace(
        precision_plugin=MixedPrecision("bf16-mixed", "cpu"), strategy=SimpleNamespace(model=module)
    )
    loss_and_gradients(tiny_encoder, collated_batch(tiny_encoder, negatives=1))
    optimizer = torch.optim.AdamW(module._param_groups(), fused=True)
    module.configure_gradient_clipping(optimizer, gradient_clip_val=1e-3, gradient_clip_algorithm="norm")
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters() if p.grad is not None]))
    assert norm == pytest.approx(1e-3, rel=1e-3)
