"""The bad-input gallery: each mistake stops the run before training, with a message that names the file, the
line or id and the fix, and nothing is written to output_dir; plus NaN handling, output safety and determinism."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import REPO, compose_train, tiny_run_overrides, write_toy_data
from hydra.errors import ConfigCompositionException

from lit_embed.errors import LitEmbedError, NonFiniteLossError
from lit_embed.losses.mnrl import MultipleNegativesRankingLoss
from lit_embed.models.saving import to_sentence_transformers
from lit_embed.train import run
from lit_embed.training.callbacks.checkpointing import StepCheckpoint
from lit_embed.training.checkpoint_io import load_checkpoint
from lit_embed.training.lifecycle import mark_run_folder
from lit_embed.training.module import EmbeddingFinetuneModule

GOOD = {"queries": {"q1": "a question"}, "corpus": {"d1": "an answer"}, "relevant_docs": {"q1": ["d1"]}}


def broken(**changes) -> dict:
    data = json.loads(json.dumps(GOOD))
    data.update(changes)
    return data


# (file name, content, the error must match this)
GALLERY = [
    ("syntax.json", '{"queries": {"q1": "x"},\n "corpus": {', r"syntax\.json, line 2, column \d+: malformed JSON"),
    ("syntax.jsonl", '{"query": "a", "positive": "b"}\n{"query": "a" "positive": "b"}\n', r"syntax\.jsonl, line 2"),
    ("schema.json", {"questions": {}, "corpus": {}}, r"schema\.json: missing key\(s\) \['queries', 'relevant_docs'\]"),
    ("schema.jsonl", '{"query": "a", "answer": "b"}\n', r"schema\.jsonl, line 1: .*\"query\" and \"positive\""),
    ("types.json", broken(corpus=["an answer"]), r"types\.json: 'corpus' must be an object mapping ids"),
    ("unknown_query.json", broken(relevant_docs={"q1": ["d1"], "q9": ["d1"]}), r"names query 'q9'"),
    ("unknown_doc.json", broken(relevant_docs={"q1": ["d7"]}), r"query 'q1' names document 'd7'.*not in 'corpus'"),
    (
        "duplicate.json",
        '{"queries": {"q1": "a", "q1": "b"}, "corpus": {"d1": "x"}, "relevant_docs": {"q1": ["d1"]}}',
        r"duplicate\.json: id 'q1' appears twice",
    ),
    ("empty.json", broken(corpus={"d1": "   "}), r"empty\.json: document 'd1' has empty text"),
    ("empty.jsonl", '{"query": "", "positive": "b"}\n', r"empty\.jsonl, line 1: query is empty"),
    (
        "unanswered.json",
        broken(queries={"q1": "a question", "q2": "another"}),
        r"unanswered\.json: 1 of 2 queries have no relevant document \(first: 'q2'\)",
    ),
]


@pytest.mark.parametrize(("name", "content", "expected"), GALLERY, ids=[g[0] for g in GALLERY])
@pytest.mark.parametrize("split", ["train", "val"])
def test_gallery(tmp_path: Path, name: str, content, expected: str, split: str) -> None:
    train, val = write_toy_data(tmp_path)
    bad = tmp_path / name
    bad.write_text(content if isinstance(content, str) else json.dumps(content))
    out = tmp_path / "out"
    paths = {"train": bad, "val": val} if split == "train" else {"train": train, "val": bad}
    with pytest.raises(LitEmbedError, match=expected):
        run(compose_train(tiny_run_overrides(paths["train"], paths["val"], out)))
    assert not out.exists(), "nothing may be written before the input is known to be good"


def test_non_utf8(tmp_path: Path) -> None:
    train, val = write_toy_data(tmp_path)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"query": "a", "positive": "b"}\n{"query": "café", "positive": "c"}\n'.encode("latin-1"))
    with pytest.raises(LitEmbedError, match=r"latin1\.jsonl, line 2: the file is not valid UTF-8.*iconv"):
        run(compose_train(tiny_run_overrides(latin1, val, tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_smaller_than_one_batch_after_deduplication(tmp_path: Path) -> None:
    rows = [{"query": "same question", "positive": "same answer"}] * 20 + [{"query": "other", "positive": "x"}]
    path = tmp_path / "dups.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(LitEmbedError, match=r"dups\.jsonl: only 2 training pairs.*data\.batch_size=8"):
        run(compose_train(tiny_run_overrides(path, None, tmp_path / "out")))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_a_training_file_without_pairs_is_refused_whatever_the_batch_size(tmp_path: Path, content: str) -> None:
    path = tmp_path / "nothing.jsonl"
    path.write_text(content)
    overrides = tiny_run_overrides(path, None, tmp_path / "out", **{"data.batch_size": "auto"})
    with pytest.raises(LitEmbedError, match=r"nothing\.jsonl: no training pairs"):
        run(compose_train(overrides))
    assert not (tmp_path / "out").exists()


def test_missing_model_path(tmp_path: Path) -> None:
    train, val = write_toy_data(tmp_path)
    overrides = tiny_run_overrides(train, val, tmp_path / "out") + ["model=minilm", "model.model_name_or_path=./nope"]
    with pytest.raises(LitEmbedError, match=r"model path \./nope does not exist"):
        run(compose_train(overrides))
    assert not (tmp_path / "out").exists()


def test_unknown_config_key() -> None:
    with pytest.raises(ConfigCompositionException, match="optimizer.learning_rate"):
        compose_train(["optimizer.learning_rate=1e-3"])


def test_long_texts_are_truncated_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [
        {"query": f"question {i}", "positive": (f"{i} " + "word " * 400 if i < 3 else f"short answer {i}")}
        for i in range(16)
    ]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        run(compose_train(tiny_run_overrides(path, None, tmp_path / "out", **{"trainer.max_steps": 1})))
    warnings = [r.getMessage() for r in caplog.records if "max_seq_length" in r.getMessage()]
    assert warnings == [
        "3 of 16 document texts reach model.max_seq_length=128 tokens and are cut there; raise "
        "model.max_seq_length to keep more of them."
    ]


def test_a_finished_model_is_not_overwritten(tmp_path: Path) -> None:
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "weights").write_text("the finished model")
    mark_run_folder(out)  # a finished run's folder
    with pytest.raises(LitEmbedError, match=r"already holds a finished model.*overwrite=true"):
        run(compose_train(tiny_run_overrides(train, val, out)))
    assert (out / "model" / "weights").read_text() == "the finished model"
    run(compose_train(tiny_run_overrides(train, val, out, overwrite="true", **{"trainer.max_steps": 1})))
    assert (out / "model" / "model.safetensors").is_file() and not (out / "model" / "weights").exists()


def nan_on_call(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """Makes the loss NaN on its ``call``-th evaluation (0-based): a NaN injected into one batch."""
    original = MultipleNegativesRankingLoss.forward
    calls = {"n": 0}

    def forward(self, embedded):
        loss = original(self, embedded)
        calls["n"] += 1
        return loss * float("nan") if calls["n"] - 1 == call else loss

    monkeypatch.setattr(MultipleNegativesRankingLoss, "forward", forward)


# fused AdamW skips a non-finite step on the device (no host sync); the unfused one is checked on the host
@pytest.mark.parametrize("fused", ["true", "false"])
def test_nan_loss_stops_with_the_step_and_the_batch_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fused: str
) -> None:
    train, val = write_toy_data(tmp_path)
    nan_on_call(monkeypatch, call=2)
    out = tmp_path / "out"
    settings = {"checkpoint.save_steps": 1, "optimizer.fused": fused}
    with pytest.raises(NonFiniteLossError, match=r"the loss is nan at step 2 .*query ids \['q\d+'.*skip_nonfinite"):
        run(compose_train(tiny_run_overrides(train, val, out, **settings)))
    assert load_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 2  # the work so far is kept
    assert not (out / "model").exists()


@pytest.mark.parametrize(("fused", "loss"), [("true", "mnrl"), ("false", "mnrl"), ("true", "cached_mnrl")])
def test_nan_loss_skipped_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fused: str, loss: str) -> None:
    train, val = write_toy_data(tmp_path)
    nan_on_call(monkeypatch, call=2)
    out = tmp_path / "out"
    settings = {"method.skip_nonfinite": "true", "optimizer.fused": fused}
    run(compose_train([f"loss={loss}", *tiny_run_overrides(train, val, out, **settings)]))
    last = load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4 and last["skipped_batches"] == 1
    assert all(torch.isfinite(w).all() for w in last["state_dict"].values())
    logged = (out / "logs" / "version_0" / "metrics.csv").read_text()
    assert "train/skipped_batches" in logged


def test_a_skipped_step_on_the_device_changes_no_weight_and_reads_nothing_in_the_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the fused optimizer the step (loss, backward's flag, optimizer) reads no device value on the host; the
    NaN step leaves every weight and the optimizer's moments as the step before left them."""
    reads: list[tuple[str, int]] = []
    weights: list[dict[str, torch.Tensor]] = []

    def profiled(method):
        def wrapper(self, *args, **kwargs):
            with torch.profiler.profile() as profile:
                result = method(self, *args, **kwargs)
            reads.append((method.__name__, sum(e.name == "aten::_local_scalar_dense" for e in profile.events())))
            return result

        return wrapper

    def on_train_batch_start(self, batch, batch_idx):
        weights.append({name: value.detach().clone() for name, value in self.encoder.state_dict().items()})

    module_class = EmbeddingFinetuneModule
    monkeypatch.setattr(module_class, "training_step", profiled(module_class.training_step))
    monkeypatch.setattr(module_class, "on_before_optimizer_step", profiled(module_class.on_before_optimizer_step))
    monkeypatch.setattr(torch.optim.AdamW, "step", profiled(torch.optim.AdamW.step))
    monkeypatch.setattr(module_class, "on_train_batch_start", on_train_batch_start, raising=False)
    train, val = write_toy_data(tmp_path)
    nan_on_call(monkeypatch, call=1)
    settings = {"method.skip_nonfinite": "true", "trainer.max_steps": 3, "trainer.log_every_n_steps": 100}
    run(compose_train(tiny_run_overrides(train, val, tmp_path / "out", load_best_model_at_end="false", **settings)))
    assert len(reads) == 9 and not any(count for _, count in reads)
    assert all(torch.equal(weights[1][name], weights[2][name]) for name in weights[1])  # step 1 was skipped
    assert not all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    # The unfused optimizer needs the host check: one read a step.
    reads.clear()
    settings["optimizer.fused"] = "false"
    run(compose_train(tiny_run_overrides(train, val, tmp_path / "out2", load_best_model_at_end="false", **settings)))
    assert [count for name, count in reads if name == "training_step"] == [1, 1, 1]


def test_non_finite_gradients_of_a_finite_loss_skip_the_step_too() -> None:
    from lit_embed.training.nonfinite import NonFiniteSteps

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    steps = NonFiniteSteps()
    for step, grad in enumerate([[1.0, 1.0, 1.0], [1.0, float("inf"), 1.0], [1.0, 1.0, 1.0]]):
        steps.record(step, step, 0, [f"q{step}"], torch.tensor(0.5))
        weight.grad = torch.tensor(grad)
        before = weight.detach().clone()
        steps.flag(optimizer, step, [weight.grad])
        optimizer.step()
        assert torch.equal(weight, before) is (step == 1)  # only the inf step leaves the weight as it was
    skipped = steps.read()
    assert (skipped.step, skipped.query_ids, skipped.loss, skipped.count) == (1, ["q1"], 0.5, 1)
    assert steps.read() is None and steps.unread_steps() == 0  # what was read is forgotten
    assert optimizer.state[weight]["step"] == 2  # the skipped step did not count


def test_non_finite_weights_are_never_exported_or_best(tmp_path: Path, tiny_encoder) -> None:
    module = SimpleNamespace(parameters=tiny_encoder.parameters)
    trainer = SimpleNamespace(callback_metrics={"val/ndcg@10": torch.tensor(0.9)})
    assert StepCheckpoint()._improved(trainer, module)
    with torch.no_grad():
        next(tiny_encoder.parameters())[0, 0] = float("nan")
    assert not StepCheckpoint()._improved(trainer, module)
    with pytest.raises(LitEmbedError, match="weights contain NaN"):
        to_sentence_transformers(tiny_encoder, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_same_seed_same_weights_bit_for_bit(tmp_path: Path) -> None:
    train, val = write_toy_data(tmp_path)
    weights = []
    for name in ("a", "b"):
        run(compose_train(tiny_run_overrides(train, val, tmp_path / name, load_best_model_at_end="false")))
        weights.append(load_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt")["state_dict"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def train_command(out: Path, *extra: str) -> list[str]:
    args = ["model=tiny", "trainer=cpu", "data.num_train=400", "data.num_val=40", "data.batch_size=4"]
    args += ["trainer.max_steps=60", "eval.evaluation_steps=0", f"output_dir={out}", *extra]
    return [sys.executable, "train.py", *args]


def wait_for(path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
def test_cli_exit_code_and_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"queries": ')
    out = tmp_path / "out"
    cmd = [sys.executable, "train.py", "data=qa_json", f"data.train_path={bad}", f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "bad.json, line 1" in proc.stdout + proc.stderr and "Traceback" not in proc.stdout + proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [".hydra", "train.log"]  # only Hydra's record of the run


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_killed_training_resumes_to_the_same_weights(tmp_path: Path, signum: int) -> None:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    straight = tmp_path / "straight"
    subprocess.run(
        train_command(straight, "checkpoint.save_steps=5"),
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )

    out = tmp_path / "killed"
    # SIGTERM must save on its own: no periodic checkpoints then.
    save_steps = "checkpoint.save_steps=5" if signum == signal.SIGKILL else "checkpoint.save_steps=0"
    proc = subprocess.Popen(
        train_command(out, save_steps), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for(out / "checkpoints" / ("step=10.ckpt" if signum == signal.SIGKILL else "step=0.ckpt"))
    time.sleep(0.5)
    proc.send_signal(signum)
    code = proc.wait(timeout=120)
    assert code == (-signal.SIGKILL if signum == signal.SIGKILL else 143)
    interrupted_at = load_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"]
    assert 0 < interrupted_at < 60
    assert not (out / "model").exists()

    subprocess.run(
        train_command(out, save_steps, "resume=true"), cwd=REPO, env=env, check=True, capture_output=True, timeout=600
    )
    expected = load_checkpoint(straight / "checkpoints" / "last.ckpt")["state_dict"]
    actual = load_checkpoint(out / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
