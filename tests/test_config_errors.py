"""Every value a user can mistype on the command line ends in one message that names the key, the value and what is
allowed, and exit status 2: no traceback, no Hydra wrapper."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, compose_train, tiny_run_overrides, write_toy_data

from lit_embed.config import build, check_added_keys
from lit_embed.errors import LitEmbedError
from lit_embed.train import run
from lit_embed.training.checkpoint_io import load_checkpoint

# (overrides, a fragment of the one message)
INVALID_VALUES = [
    (["data.batch_size=0"], "data.batch_size=0 is not allowed: a whole number of pairs >= 1"),
    (["data.batch_size=abc"], "data.batch_size='abc' is not allowed"),
    (["data.length_groups=0"], "data.length_groups=0 is not allowed"),
    (["data.num_workers=-1"], "data.num_workers=-1 is not allowed"),
    (["data.max_negatives=-1"], "data.max_negatives=-1 is not allowed"),
    (["data.use_all_docs=maybe"], "data.use_all_docs='maybe' is not allowed: true or false"),
    (["loss.scale=0"], "loss.scale=0 is not allowed: the scale must be positive"),
    (["loss.query_chunk_size=0"], "loss.query_chunk_size=0 is not allowed"),
    (["loss=cached_mnrl", "loss.mini_batch_size=0"], "loss.mini_batch_size=0 is not allowed"),
    (["loss=cached_mnrl", "loss.loss.scale=-1"], "loss.loss.scale=-1 is not allowed"),
    (["loss=matryoshka", "loss.dims=[0]"], "loss.dims needs one or more positive embedding sizes"),
    (["checkpoint.mode=best"], "checkpoint.mode='best' is not allowed: max (higher monitor is better) or min"),
    (["checkpoint.save_steps=-1"], "checkpoint.save_steps=-1 is not allowed"),
    (["checkpoint.save_total_limit=-2"], "checkpoint.save_total_limit=-2 is not allowed"),
    (["eval.evaluation_steps=-1"], "eval.evaluation_steps=-1 is not allowed"),
    (["eval.batch_size=0"], "eval.batch_size=0 is not allowed"),
    (["eval.corpus_chunk_size=0"], "eval.corpus_chunk_size=0 is not allowed"),
    (["eval.truncate_dim=0"], "eval.truncate_dim must be a positive embedding size or null, got 0"),
    (["optimizer.lr=-1"], "optimizer.lr=-1 is not allowed: a learning rate > 0"),
    (["optimizer.lr=0"], "optimizer.lr=0 is not allowed"),
    (["optimizer.fused=maybe"], "optimizer.fused='maybe' is not allowed: true, false or null"),
    (["trainer.enable_checkpointing=maybe"], "trainer.enable_checkpointing='maybe' is not allowed: true or false"),
    (["trainer.deterministic=3"], "trainer.deterministic=3 is not allowed: true, false or warn"),
    (["trainer.num_sanity_val_steps=abc"], "trainer.num_sanity_val_steps='abc' is not allowed"),
    (["logger.version=-1"], "logger.version=-1 is not allowed: a whole number >= 0 or a name"),
    (["logger.name=7"], "logger.name=7 is not allowed: a text"),
    (["logger=tensorboard", "logger.default_hp_metric=maybe"], "logger.default_hp_metric='maybe' is not allowed"),
    (["checkpoint.monitor=-1"], "checkpoint.monitor=-1 is not allowed: a logged metric's name, or null"),
    (["++data.columns=abc"], "data.columns='abc' is not allowed: which column holds what"),
    (["data.max_skipped=2.5"], "data.max_skipped=2.5 is not allowed"),
    (["callbacks.training_plot.metrics=ndcg@10"], "callbacks.training_plot.metrics='ndcg@10' is not allowed: a list"),
    (["model.model_name_or_path.dropout=1"], "model.model_name_or_path.dropout=1 is not allowed: a probability"),
    (["optimizer.weight_decay=-0.5"], "Invalid weight_decay value: -0.5"),
    (
        ["scheduler.warmup_ratio=1.5"],
        "scheduler.warmup_ratio=1.5 is not allowed: a fraction of the steps between 0 and 1",
    ),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0 is not allowed"),
    (["trainer.max_steps=-5"], "trainer.max_steps=-5 is not allowed"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1 is not allowed"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0 is not allowed"),
    (["trainer.accelerator=abacus"], "trainer: You selected an invalid accelerator name"),
    (["trainer.precision=17"], "trainer: "),
    (["model.max_seq_length=0"], "model.max_seq_length=0 is not allowed"),
    (["method.skip_nonfinite=sometimes"], "method.skip_nonfinite='sometimes' is not allowed: true or false"),
    (["seed=abc"], "seed='abc' is not allowed: a whole number"),
    (["seed=-1"], "seed=-1 is not allowed: a whole number from 0 to 2**32 - 1"),
    (["output_dir="], "output_dir='' is not allowed: a folder for everything the run writes"),
    (["method=adapter", "method.encoder.cache_dir=123"], "method.encoder.cache_dir=123 is not allowed"),
    (["model.max_seq_length=100000"], "model.max_seq_length=100000 is not allowed: at most 512 tokens"),
    (
        ["loss=matryoshka", "loss.dims=abc"],
        "loss.dims needs a list of embedding sizes such as [384,256,128], got 'abc'",
    ),
    (["method=adapter", "adapter.bias=maybe"], "adapter.bias='maybe' is not allowed: true or false"),
    (["model.query_prompt=123"], "model.query_prompt=123 is not allowed: a text (quote it)"),
    (["callbacks.training_plot.metrics=[speed]"], "callbacks.training_plot.metrics=['speed'] is not allowed"),
    (["++callbacks.pairs_per_second.smoothing=1.5"], "callbacks.pairs_per_second.smoothing=1.5 is not allowed"),
    (["overwrite=maybe"], "overwrite='maybe' is not allowed: true or false"),
    (["optimized_metric=speed"], "optimized_metric=speed is not a validation metric"),
    (["resume=nowhere.ckpt"], "cannot resume: nowhere.ckpt does not exist"),
    (["method=adapter", "adapter.out_dim=0"], "adapter.out_dim=0 is not allowed"),
    (["method=adapter", "adapter=mlp", "adapter.activation=gelu"], "adapter.activation='gelu' is not allowed"),
    (["method=adapter", "adapter.transform=documents"], "adapter.transform='documents' is not allowed"),
    (["method=adapter", "method.encoder.batch_size=0"], "method.encoder.batch_size=0 is not allowed"),
    (["method=adapter", "method.encoder.adapter=abc"], "method.encoder.adapter='abc' is not allowed: an adapter"),
]


@pytest.mark.parametrize(("overrides", "message"), INVALID_VALUES, ids=[" ".join(o) for o, _ in INVALID_VALUES])
def test_invalid_value_names_key_value_and_what_is_allowed(tmp_path: Path, overrides: list[str], message: str) -> None:
    train, val = write_toy_data(tmp_path, num_train=16, num_val=4)
    out = tmp_path / "out"
    with pytest.raises(LitEmbedError) as err:
        run(compose_train([*tiny_run_overrides(train, val, out), *overrides]))
    assert message in str(err.value)
    assert not (out / "checkpoints").exists() and not (out / "model").exists()


def test_stdlib_split_sizes_are_checked() -> None:
    with pytest.raises(LitEmbedError, match=r"data.num_train=-5 is not allowed: a whole number >= 0"):
        build(compose_train(["data.num_train=-5"]).data, "data")
    with pytest.raises(LitEmbedError, match="data=stdlib builds its own data"):
        build(compose_train(["data.train_path=train.json"]).data, "data")


def test_multitask_mode_is_checked(tmp_path: Path) -> None:
    train, _ = write_toy_data(tmp_path, num_train=16, num_val=4)
    cfg = compose_train(
        ["data=multitask", f"data.tasks.qa.data.train_path={train}", f"data.tasks.triplets.data.train_path={train}"]
        + ["data.mode=shuffled"]
    )
    with pytest.raises(LitEmbedError, match=r"data.mode='shuffled' is not allowed: one of round_robin, proportional"):
        build(cfg.data, "data")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # A top-level typo: the nearest real key, which exists, so it is set without +.
        (
            ["+optimiser.lr=1e-4"],
            "+optimiser.lr=0.0001: no part of the run reads optimiser.lr, so it would change "
            "nothing. Did you mean optimizer.lr? Write optimizer.lr=0.0001 (without +: that key is in the config",
        ),
        # Below a _target_: the constructor's arguments, in the config or not.
        (["+trainer.fast_dev_runn=1"], "Did you mean trainer.fast_dev_run? Write +trainer.fast_dev_run=1."),
        (["+data.val_fractio=0.2"], "Did you mean data.val_fraction? Write data.val_fraction=0.2 (without +"),
        (["+eval.guard=x.json"], "Did you mean eval.guard_path? Write eval.guard_path=x.json (without +"),
        (
            ["++trainer.nothing_like_it=1"],
            "++trainer.nothing_like_it=1: no part of the run reads "
            "trainer.nothing_like_it, so it would change nothing. Remove it.",
        ),
        (["method=lora", "+lora.rr=8"], "Did you mean lora.r? Write lora.r=8"),
    ],
)
def test_an_added_key_that_nothing_reads_is_refused_naming_the_nearest(args: list[str], message: str) -> None:
    cfg = compose_train(args)
    with pytest.raises(LitEmbedError) as err:
        check_added_keys(cfg, args)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "args",
    [
        ["+trainer.fast_dev_run=1"],  # a Trainer argument the config does not set
        ["+optimizer.foreach=false"],  # of a _partial_ target
        ["++data.num_train=3"],  # ++ on an existing key changes it
        ["++seed=3"],
        ["+callbacks.timer={_target_:lightning.pytorch.callbacks.Timer}"],  # a new extra callback is built
        ["+callbacks.timer._target_=lightning.pytorch.callbacks.Timer", "+callbacks.timer.duration=00:01:00:00"],
        ["+adapter=mlp"],  # a config group, not a key
        ["data=multitask", "+data.tasks.more.data.train_path=x.jsonl"],  # an argument's own dict
        ["+hydra.job.env_set.X=1"],  # Hydra checks its own
    ],
)
def test_added_keys_that_the_run_reads_pass(args: list[str]) -> None:
    check_added_keys(compose_train(args), args)


def test_an_added_typo_exits_2_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "train.py", "model=tiny", f"output_dir={out}", "+optimiser.lr=1e-4"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Did you mean optimizer.lr?" in output and "Traceback" not in output
    assert not out.exists() or not any(out.iterdir())  # the folder Hydra made stays empty: a rerun may take it


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["loss.scale=0"], "loss.scale=0 is not allowed"),
        pytest.param(["checkpoint.mode=best"], "checkpoint.mode='best' is not allowed", marks=pytest.mark.slow),
        (["data.batchsize=3"], "Could not override 'data.batchsize'"),  # Hydra's own message for an unknown key
        pytest.param(["model=nonexistent"], "Could not find 'model/nonexistent'", marks=pytest.mark.slow),
        pytest.param(
            ["data=qa_json"],
            "data.train_path has no value: set it on the command line (data.train_path=...).",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_command_line_exits_2_with_one_message(tmp_path: Path, args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "train.py", "model=tiny", "trainer=cpu", f"output_dir={tmp_path / 'out'}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr  # Hydra logs to stdout
    assert result.returncode == 2, output
    assert message in output
    for noise in ("Traceback", "Error executing job", "Error in call to target"):
        assert noise not in output, output


def test_lightning_cli_reports_an_invalid_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lit_embed import cli

    config = REPO / "conf" / "cli" / "full.yaml"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(
            ["fit", f"--config={config}", "--data.init_args.batch_size=0", f"--trainer.default_root_dir={tmp_path}"]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "lit-embed: error: batch_size=0 is not allowed: a whole number of pairs >= 1" in err
    assert "Traceback" not in err


def test_hydra_full_error_shows_the_original_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra.errors import InstantiationException

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(InstantiationException, match="scale"):
        build(compose_train(["loss.scale=0"]).loss, "loss")


def test_an_empty_validation_split_means_no_validation(tmp_path: Path) -> None:
    data = build(compose_train(["data.num_train=64", "data.num_val=0"]).data, "data")
    data.prepare_data()
    assert data.val_dataset is None and len(data.rows.queries) == 64
    empty = tmp_path / "empty.json"
    empty.write_text('{"queries": {}, "corpus": {}, "relevant_docs": {}}')
    train, _ = write_toy_data(tmp_path, num_train=16, num_val=4)
    with pytest.raises(LitEmbedError, match=r"empty.json: no validation queries"):
        run(compose_train(tiny_run_overrides(train, empty, tmp_path / "out")))


def test_a_monitor_that_is_never_logged_is_named_in_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    train, val = write_toy_data(tmp_path, num_train=16, num_val=4)
    overrides = tiny_run_overrides(train, val, tmp_path / "out", **{"checkpoint.monitor": "val/ndcg10"})
    metrics = run(compose_train(overrides))
    assert "checkpoint.monitor=val/ndcg10 was never logged" in caplog.text and "val/ndcg@10" in caplog.text
    last = load_checkpoint(tmp_path / "out" / "checkpoints" / "last.ckpt")
    assert metrics["final"]["step"] == last["global_step"] > 0  # no best: the last step is exported
