"""A run's life in its output_dir: one run at a time, a refused run changes nothing, a resume trains what its
checkpoint trained, Ctrl-C saves, and only what resuming and the best model need is kept on disk."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, compose_train, tiny_run_overrides, toy_split, write_toy_data

from lit_embed.data.formats import save_llamaindex_json
from lit_embed.errors import InvalidValueError, LitEmbedError
from lit_embed.files import LOCK_NAME
from lit_embed.train import run
from lit_embed.training.checkpoint_io import load_checkpoint
from lit_embed.training.lifecycle import (
    DATA_KEY,
    RUN_MARKER,
    OutputDirLock,
    RunFolder,
    changed_settings,
    check_resume_length,
    check_run_folder,
)

HOLD_LOCK = (
    "import sys, time\n"
    "from lit_embed.training.lifecycle import OutputDirLock\n"
    "OutputDirLock(sys.argv[1]).acquire()\n"
    "print('locked', flush=True)\n"
    "time.sleep(600)\n"
)


def hold_lock(output_dir: Path) -> subprocess.Popen:
    """Another process holding output_dir's lock, as a live run does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(output_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under folder: content hash and modification time."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def train_py(out: Path, *extra: str, **kwargs) -> subprocess.CompletedProcess:
    args = ["model=tiny", "trainer=cpu", "data.num_train=64", "data.num_val=16", "data.batch_size=8"]
    args += ["trainer.max_steps=2", "eval.evaluation_steps=0", f"output_dir={out}", *extra]
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=600, **kwargs
    )


# --- one run per output_dir ---------------------------------------------------------------------------------


@pytest.mark.slow  # subprocess runs; the in-process refusals below run by default
def test_a_second_run_into_a_held_output_dir_is_refused_at_once(tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = hold_lock(out)
    (out / "train.log").write_text("the live run's log\n")
    try:
        before = snapshot(out)
        proc = train_py(out)
    finally:
        holder.kill()
        holder.wait()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert f"output_dir={out} is in use by another run (process {holder.pid} on" in output
    assert "Traceback" not in output
    assert snapshot(out) == before  # no .hydra/ of the refused run, nothing else either


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path: Path) -> None:
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "run"
    holder = hold_lock(out)
    holder.send_signal(signal.SIGKILL)  # the kernel drops a flock with its process; the file stays
    holder.wait()
    assert (out / LOCK_NAME).read_text().startswith(str(holder.pid))
    metrics = run(compose_train(tiny_run_overrides(train, val, out, **{"trainer.max_steps": 1})))
    assert metrics["final"]["step"] >= 0
    assert not (out / LOCK_NAME).exists()  # released and removed at the end of the run


def test_the_lock_is_held_while_the_run_lives_and_refuses_in_process(tmp_path: Path, monkeypatch) -> None:
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "run"
    seen = []

    def second_run_during_fit(*args, **kwargs):
        with pytest.raises(LitEmbedError, match=rf"in use by another run \(process {os.getpid()} on"):
            OutputDirLock(out).acquire()
        seen.append(True)
        raise KeyboardInterrupt  # stop here: only the lock matters

    monkeypatch.setattr("lightning.Trainer.fit", second_run_during_fit)
    with pytest.raises(KeyboardInterrupt):
        run(compose_train(tiny_run_overrides(train, val, out)))
    assert seen
    OutputDirLock(out).acquire().release()  # released when the run ended, even by an exception


def test_distributed_ranks_after_the_first_do_not_take_the_lock(tmp_path: Path, monkeypatch) -> None:
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "run"
    holder = hold_lock(out)  # rank 0 of a DDP run holds it
    try:
        monkeypatch.setenv("LOCAL_RANK", "1")  # how Lightning's launcher starts rank 1
        run(compose_train(tiny_run_overrides(train, val, out, **{"trainer.max_steps": 1})))
        monkeypatch.setenv("LOCAL_RANK", "0")
        with pytest.raises(LitEmbedError, match="in use by another run"):
            run(compose_train(tiny_run_overrides(train, val, out, overwrite="true")))
    finally:
        holder.kill()
        holder.wait()


# --- a refused run changes nothing ---------------------------------------------------------------------------


@pytest.mark.slow  # subprocess runs; the in-process refusals below run by default
def test_a_refused_rerun_leaves_the_finished_run_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = train_py(out, "optimizer.lr=1e-3")
    assert first.returncode == 0, first.stderr[-3000:]
    hydra = {name: (out / ".hydra" / name).read_text() for name in ("config.yaml", "overrides.yaml", "hydra.yaml")}
    assert "optimizer.lr=1e-3" in hydra["overrides.yaml"] and "lr: 0.001" in hydra["config.yaml"]
    assert "output_subdir: null" in hydra["hydra.yaml"]
    before = snapshot(out)

    refused = train_py(out, "optimizer.lr=0.5")
    assert refused.returncode == 2
    assert "already holds a finished model" in refused.stdout + refused.stderr
    assert snapshot(out) == before  # .hydra/, train.log and every other file: same bytes, same times

    bad_setting = train_py(out, "data.batch_size=0")
    assert bad_setting.returncode == 2
    assert snapshot(out) == before


RECORD = {"config.yaml": "seed: 1\n", "overrides.yaml": "- seed=1\n"}


def test_a_run_folder_refused_inside_is_released_and_left_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with RunFolder(out, RECORD) as finished, finished.training():  # a finished run's folder
        pass
    (out / "train.log").write_text("the finished run's log\n")
    before = snapshot(out)
    root, log_file = logging.getLogger(), logging.FileHandler(out / "train.log", delay=True)  # as a Hydra job's
    root.addHandler(log_file)
    try:
        with pytest.raises(LitEmbedError, match="a setting is wrong"), RunFolder(out, {"config.yaml": "seed: 2\n"}):
            assert (out / LOCK_NAME).is_file()  # an existing folder is locked at once
            raise LitEmbedError("a setting is wrong")
        assert log_file not in root.handlers  # the message is not logged into the finished run's train.log
    finally:
        root.removeHandler(log_file)
    assert snapshot(out) == before  # no record of the refused run, no lock file left
    OutputDirLock(out).acquire().release()


def test_a_run_folder_of_the_users_is_refused_on_entering(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    with pytest.raises(LitEmbedError, match="already holds files that a lit_embed run did not make"), RunFolder(out):
        raise AssertionError("never entered")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_new_run_folder_gets_its_record_at_once_and_its_lock_for_training(tmp_path: Path) -> None:
    out = tmp_path / "new"
    with pytest.raises(LitEmbedError), RunFolder(out, RECORD) as folder:
        assert (out / ".hydra" / "config.yaml").read_text() == "seed: 1\n"  # kept even if a check fails
        assert not (out / LOCK_NAME).exists() and not (out / RUN_MARKER).exists()
        with folder.training():
            assert (out / LOCK_NAME).is_file() and (out / RUN_MARKER).is_file()
            raise LitEmbedError("training failed")
    assert not (out / LOCK_NAME).exists()


def test_a_new_folder_keeps_its_record_when_a_setting_is_wrong(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = train_py(out, "seed=-1")
    assert proc.returncode == 2 and "seed=-1 is not allowed" in proc.stdout + proc.stderr
    assert "seed=-1" in (out / ".hydra" / "overrides.yaml").read_text()  # a sweep's summary finds the job
    assert "seed=-1 is not allowed" in (out / "train.log").read_text()


@pytest.mark.slow
def test_each_sweep_job_gets_its_hydra_record(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = ["model=tiny", "trainer=cpu", "data.num_train=64", "data.num_val=16", "data.batch_size=8"]
    args += ["trainer.max_steps=1", "eval.evaluation_steps=0", f"output_dir={out}", "optimizer.lr=1e-3,2e-3"]
    proc = subprocess.run([sys.executable, "train.py", "-m", *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, lr in (("0", "0.001"), ("1", "0.002")):  # as Hydra writes a swept value
        record = out / job / ".hydra"
        assert sorted(p.name for p in record.iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
        assert f"optimizer.lr={lr}" in (record / "overrides.yaml").read_text()
        assert f"lr: {lr}" in (record / "config.yaml").read_text()


# --- a run writes only into its own folder --------------------------------------------------------------------


def test_a_folder_of_the_users_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "results"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "mine.csv").write_text("a,b\n")
    (out / "metrics.json").write_text('{"mine": 1}\n')
    (out / "train.log").write_text("my own log\n")
    before = snapshot(out)
    proc = train_py(out)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    made = f"output_dir={out} already holds files that a lit_embed run did not make"
    assert f"{made} (logs/, metrics.json, train.log)" in output
    assert "Traceback" not in output
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["logs", "metrics.json", "train.log"]
    train, val = write_toy_data(tmp_path)
    with pytest.raises(LitEmbedError, match="already holds files that a lit_embed run did not make"):
        run(compose_train(tiny_run_overrides(train, val, out)))  # lit_embed.finetune's way too
    assert snapshot(out) == before


def test_an_empty_folder_is_taken_and_marked_and_a_marked_one_is_taken_again(tmp_path: Path) -> None:
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "empty"
    out.mkdir()
    run(compose_train(tiny_run_overrides(train, val, out, **{"trainer.max_steps": 1})))
    assert (out / RUN_MARKER).is_file() and (out / "model").is_dir()
    run(compose_train(tiny_run_overrides(train, val, out, overwrite="true", **{"trainer.max_steps": 1})))


@pytest.mark.parametrize("where", ["root", "home", "cwd", "file"])
def test_root_home_the_working_directory_and_a_file_are_never_an_output_dir(tmp_path: Path, where: str) -> None:
    place = {"root": Path("/"), "home": Path.home(), "cwd": Path.cwd(), "file": tmp_path / "notes.txt"}[where]
    place.parent.mkdir(parents=True, exist_ok=True)
    if where == "file":
        place.write_text("mine\n")
    message = "is a file, not a folder" if where == "file" else "so it never writes there"
    with pytest.raises(LitEmbedError, match=message):
        check_run_folder(place)
    train, val = write_toy_data(tmp_path)
    with pytest.raises(LitEmbedError, match=message):
        run(compose_train(tiny_run_overrides(train, val, place)))


@pytest.mark.parametrize(
    "where",
    ["/", pytest.param("a file", marks=pytest.mark.slow), pytest.param("${oc.env:HOME}", marks=pytest.mark.slow)],
)
def test_train_py_refuses_root_a_file_and_home_in_one_message_writing_nothing(tmp_path: Path, where: str) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("mine\n")
    target = str(file) if where == "a file" else where
    home_before = sorted(p.name for p in Path.home().iterdir())
    root_before = sorted(p.name for p in Path("/").iterdir())
    proc = train_py(Path("unused"), f"output_dir={target}")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output and ("is a file, not a folder" in output or "never writes there" in output)
    assert sorted(p.name for p in Path.home().iterdir()) == home_before
    assert sorted(p.name for p in Path("/").iterdir()) == root_before
    assert file.read_text() == "mine\n"


# --- a resume trains what its checkpoint trained -------------------------------------------------------------


def interrupted_run(tmp_path: Path, **settings: object) -> tuple[Path, Path, Path]:
    """A finished tiny run with its model/ removed: a folder as a killed run leaves it."""
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "run"
    run(compose_train(tiny_run_overrides(train, val, out, **settings)))
    shutil.rmtree(out / "model")
    return train, val, out


def test_resume_auto_starts_continues_a_preempted_run_exactly_and_leaves_a_finished_one(tmp_path: Path) -> None:
    """One command for the first start and every requeue: a new folder starts, a run stopped by SIGTERM (as a cluster
    preempts) continues to the weights of an uninterrupted run, and a finished one is left as it is."""
    from lit_embed.errors import StoppedError

    train, val = write_toy_data(tmp_path)
    steps = {"trainer.max_steps": 6, "load_best_model_at_end": "false"}
    run(compose_train(tiny_run_overrides(train, val, tmp_path / "straight", **steps)))
    out = tmp_path / "run"
    auto = tiny_run_overrides(train, val, out, resume="auto", **steps)
    preempt = ["+callbacks.preempt._target_=helpers.SignalAt", "+callbacks.preempt.step=3"]
    with pytest.raises(StoppedError, match="stopped by SIGTERM; the checkpoint is saved"):
        run(compose_train(auto + preempt))  # the first start: no checkpoint yet
    assert 3 <= load_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] < 6
    assert not (out / "model").exists()

    metrics = run(compose_train(auto))  # the requeued job, the same command
    expected = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")["state_dict"]
    actual = load_checkpoint(out / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.equal(expected[k], actual[k]) for k in expected)

    finished = snapshot(out)
    assert run(compose_train(auto)) == metrics  # requeued once more: nothing to do
    assert snapshot(out) == finished
    with pytest.raises(InvalidValueError, match=r"resume=3 is not allowed: true .*, auto \(that checkpoint where"):
        run(compose_train(tiny_run_overrides(train, val, tmp_path / "bad", resume=3)))


def test_resume_with_another_batch_size_or_model_is_refused_listing_the_changes(tmp_path: Path) -> None:
    train, val, out = interrupted_run(tmp_path)
    hydra_before = snapshot(out)
    changed = {"data.batch_size": 4, "++model.model_name_or_path.hidden_size": 32, "optimizer.lr": 0.01}
    with pytest.raises(LitEmbedError) as err:
        run(compose_train(tiny_run_overrides(train, val, out, resume="true", **changed)))
    message = str(err.value)
    assert f"cannot resume from {out / 'checkpoints' / 'last.ckpt'}" in message
    assert "data.batch_size: 8 -> 4" in message
    assert "model.model_name_or_path.hidden_size: (not set) -> 32" in message
    assert "optimizer.lr: 0.001 -> 0.01" in message
    assert "resume_changed=true" in message
    assert snapshot(out) == hydra_before

    # Run length, evaluation, checkpointing and logging may change on a resume.
    same = {"trainer.max_steps": 6, "eval.evaluation_steps": 2, "checkpoint.save_steps": 1}
    same["trainer.log_every_n_steps"] = 3
    assert run(compose_train(tiny_run_overrides(train, val, out, resume="true", **same)))["final"]


def test_resume_changed_continues_but_weights_of_another_model_are_one_message(tmp_path: Path) -> None:
    train, val, out = interrupted_run(tmp_path)
    overrides = tiny_run_overrides(train, val, out, resume="true", resume_changed="true", **{"data.batch_size": 4})
    assert run(compose_train(overrides))["final"]
    shutil.rmtree(out / "model")

    other_model = {"++model.model_name_or_path.hidden_size": 32, "resume_changed": "true"}
    fit = r"its weights do not fit this model \(\d+ of \d+ differ, e\.g\. encoder\."
    with pytest.raises(LitEmbedError, match=fit) as err:
        run(compose_train(tiny_run_overrides(train, val, out, resume="true", **other_model)))
    assert len(str(err.value)) < 800  # one message, not a page of size mismatches


def test_resume_path_from_another_runs_checkpoint(tmp_path: Path) -> None:
    train, val, out = interrupted_run(tmp_path)
    last = out / "checkpoints" / "last.ckpt"
    # Same settings in another folder: the tiny model's ${output_dir}/base_model path moves with the folder.
    assert run(compose_train(tiny_run_overrides(train, val, tmp_path / "copy", resume=last)))["final"]
    with pytest.raises(LitEmbedError, match="data.batch_size: 8 -> 16"):
        run(compose_train(tiny_run_overrides(train, val, tmp_path / "other", resume=last, **{"data.batch_size": 16})))


def test_resume_on_a_replaced_training_file_is_refused_listing_what_changed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train, val, out = interrupted_run(tmp_path)
    before = snapshot(out)
    save_llamaindex_json(toy_split(40, offset=500), train)  # the same name, other pairs
    with pytest.raises(LitEmbedError) as err:
        run(compose_train(tiny_run_overrides(train, val, out, resume="true")))
    message = str(err.value)
    assert f"cannot resume from {out / 'checkpoints' / 'last.ckpt'}: its run trained on other data" in message
    assert re.search(
        rf"data: {re.escape(str(train))}, 48 pairs \(rows \w+\) -> {re.escape(str(train))}, 40 pairs", message
    )
    assert "resume_changed=true" in message
    assert snapshot(out) == before  # refused before anything was written: the record, the log, the checkpoints

    # The same bytes again resume; resume_changed=true continues on the new data, saying so.
    save_llamaindex_json(toy_split(48), train)
    overrides = tiny_run_overrides(train, val, out, resume="true", **{"trainer.max_steps": 5})
    assert run(compose_train(overrides))["final"]
    shutil.rmtree(out / "model")
    save_llamaindex_json(toy_split(40, offset=500), train)
    overrides = tiny_run_overrides(train, val, out, resume="true", resume_changed="true", **{"trainer.max_steps": 6})
    assert run(compose_train(overrides))["final"]
    assert "resume_changed=true: resuming" in caplog.text and "on other data" in caplog.text
    assert load_checkpoint(out / "checkpoints" / "last.ckpt")[DATA_KEY]["data"]["pairs"] == 40


def test_resume_changed_must_be_a_bool(tmp_path: Path) -> None:
    train, val = write_toy_data(tmp_path)
    with pytest.raises(InvalidValueError, match="resume_changed='yes' is not allowed: true or false"):
        run(compose_train(tiny_run_overrides(train, val, tmp_path / "run", resume_changed="yes")))


def test_which_settings_count_as_changed() -> None:
    old = {
        "output_dir": "/runs/a",
        "model": {"path": "/runs/a/base_model"},
        "method": {"compile": False},
        "data": {"batch_size": 8, "num_workers": 0, "val_path": "v.json"},
        "trainer": {"max_steps": 10, "accumulate_grad_batches": 1, "precision": "32-true", "log_every_n_steps": 5},
        "eval": {"evaluation_steps": 50},
        "checkpoint": {"save_steps": 500},
        "logger": {"name": "csv"},
        "resume": None,
        "overwrite": False,
    }
    new = {
        "output_dir": "/runs/b",
        "model": {"path": "/runs/b/base_model"},
        "method": {"compile": True},
        "data": {"batch_size": 8, "num_workers": 4, "val_path": "w.json"},
        "trainer": {"max_steps": 99, "accumulate_grad_batches": 2, "precision": "bf16-mixed", "log_every_n_steps": 1},
        "eval": {"evaluation_steps": 5},
        "checkpoint": {"save_steps": 1},
        "logger": None,
        "resume": True,
        "overwrite": True,
        "resume_changed": True,
    }
    assert changed_settings(old, new) == [
        "trainer.accumulate_grad_batches: 1 -> 2",
        "trainer.precision: 32-true -> bf16-mixed",
    ]


def end_of_run_checkpoint(epochs: int, batches: int, batches_per_epoch: int) -> dict:
    """The counts Lightning's fit loop holds once training stopped, as checkpoints written then had them."""
    closed = {"ready": epochs, "started": epochs, "processed": epochs, "completed": epochs}
    done = {"ready": batches, "started": batches, "processed": batches, "completed": batches}
    fit_loop = {
        "epoch_progress": {"total": dict(closed), "current": dict(closed)},
        "epoch_loop.batch_progress": {
            "total": done,
            "current": dict(done),
            "is_last_batch": batches == batches_per_epoch,
        },
    }
    return {"global_step": (epochs - 1) * batches_per_epoch + batches, "loops": {"fit_loop": fit_loop}}


def test_the_length_check_reads_a_checkpoint_lightning_wrote_at_the_end(caplog: pytest.LogCaptureFixture) -> None:
    finished = end_of_run_checkpoint(epochs=1, batches=6, batches_per_epoch=6)  # max_epochs=1
    check_resume_length("last.ckpt", finished, max_steps=-1, max_epochs=1)
    assert "trained 6 steps (1 epoch), all that trainer.max_epochs=1 allows: nothing is left" in caplog.text
    with pytest.raises(LitEmbedError, match=r"cannot continue last.ckpt with a longer run: .*step=N.ckpt"):
        check_resume_length("last.ckpt", finished, max_steps=-1, max_epochs=2)
    stopped = end_of_run_checkpoint(epochs=2, batches=3, batches_per_epoch=6)  # max_steps=9, mid-epoch
    check_resume_length("last.ckpt", stopped, max_steps=9, max_epochs=-1)
    assert "trained 9 steps (1 epoch and 3 batches), all that trainer.max_steps=9 allows" in caplog.text
    with pytest.raises(LitEmbedError, match=r"trained 9 steps \(1 epoch and 3 batches\), past trainer.max_epochs=1"):
        check_resume_length("last.ckpt", stopped, max_steps=-1, max_epochs=1)
    assert stopped["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 2  # read, not rewritten


def test_a_setting_added_since_the_old_run_counts_as_unchanged_while_it_is_off() -> None:
    """A run written before method.gradient_checkpointing existed trained without it: resuming with it off is fine."""
    old = {"model": {"path": "m"}, "method": {}, "data": {"batch_size": 8}}
    data = {"batch_size": 8}
    off = {"model": {"path": "m", "dtype": None}, "method": {"gradient_checkpointing": False}, "data": data}
    assert changed_settings(old, off) == []
    on = {"model": {"path": "m", "dtype": "bfloat16"}, "method": {"gradient_checkpointing": True}, "data": data}
    assert changed_settings(old, on) == [
        "method.gradient_checkpointing: (not set) -> True",
        "model.dtype: (not set) -> bfloat16",
    ]


# --- Ctrl-C ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resumes_to_the_same_weights(tmp_path: Path) -> None:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    common = ["data.num_train=400", "data.num_val=40", "data.batch_size=4", "trainer.max_steps=60"]
    common += ["checkpoint.save_steps=0"]  # Ctrl-C must save on its own
    straight = train_py(tmp_path / "straight", *common, env=env)
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "interrupted"
    args = ["model=tiny", "trainer=cpu", "eval.evaluation_steps=0", f"output_dir={out}", *common]
    proc = subprocess.Popen(
        [sys.executable, "train.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step=0.ckpt").exists():
        assert time.monotonic() < deadline and proc.poll() is None, "training never started"
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, output[-3000:]
    assert "stopped by Ctrl-C; the checkpoint is saved. Continue with resume=true." in output
    assert "Traceback" not in output
    interrupted_at = load_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"]
    assert 0 < interrupted_at < 60
    assert not (out / "model").exists()

    resumed = train_py(out, *common, "resume=true", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")["state_dict"]
    actual = load_checkpoint(out / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_ctrl_c_outside_training_is_a_plain_keyboard_interrupt() -> None:
    from lit_embed.training.lifecycle import ctrl_c_saves

    with pytest.raises(KeyboardInterrupt), ctrl_c_saves() as received:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    assert received == []


def test_a_signal_during_fit_ends_in_the_message_that_says_how_to_continue() -> None:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lit_embed.errors import StoppedError
    from lit_embed.training.lifecycle import stopped_by_signal

    cli_hint = "--ckpt_path=<default_root_dir>/checkpoints/last.ckpt"
    with pytest.raises(StoppedError) as stopped, stopped_by_signal(cli_hint):
        raise SIGTERMException  # what Lightning raises in fit after its SIGTERM handler ran
    assert str(stopped.value) == f"stopped by SIGTERM; the checkpoint is saved. Continue with {cli_hint}."
    assert stopped.value.exit_code == 143


# --- what is kept on disk ---------------------------------------------------------------------------------------


def test_by_default_only_last_and_the_best_weights_are_kept(tmp_path: Path, capsys, monkeypatch) -> None:
    from lit_embed.training.callbacks.ir_eval import IREvaluationCallback

    def on_train_batch_end(self, trainer, pl_module, *args):  # best at step 2, worse afterwards
        trainer.callback_metrics["val/score"] = torch.tensor(-abs(float(trainer.global_step) - 2))

    monkeypatch.setattr(IREvaluationCallback, "on_train_batch_end", on_train_batch_end)
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "run"
    settings = {"trainer.max_steps": 5, "checkpoint.save_steps": 1, "checkpoint.monitor": "val/score"}
    metrics = run(compose_train(tiny_run_overrides(train, val, out, **settings)))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step=2.ckpt", "step=5.ckpt"]
    assert (out / "checkpoints" / "last.ckpt").samefile(out / "checkpoints" / "step=5.ckpt")
    best = load_checkpoint(out / "checkpoints" / "step=2.ckpt")
    assert best["weights_only_best"] and "optimizer_states" not in best
    assert all(key.startswith("encoder.") for key in best["state_dict"])
    full = (out / "checkpoints" / "last.ckpt").stat().st_size
    assert (out / "checkpoints" / "step=2.ckpt").stat().st_size < full / 2
    assert metrics["final"]["step"] == 2  # load_best_model_at_end reads the slimmed best
    assert (
        "checkpoints: kept last.ckpt (resume, step 5) and best step=2.ckpt (val/score -0.0000, weights only)"
        in capsys.readouterr().out
    )

    # lit-embed-export still writes a model from it; a resume from it is one message.
    target = tmp_path / "exported"
    cmd = [sys.executable, "-m", "lit_embed.export", str(out / "checkpoints" / "step=2.ckpt"), str(target)]
    subprocess.run(cmd, check=True, capture_output=True)
    assert (target / "model.safetensors").read_bytes() == (out / "model" / "model.safetensors").read_bytes()
    with pytest.raises(LitEmbedError, match="holds only the model's weights.*Resume from last.ckpt"):
        best_path = f'"{out / "checkpoints" / "step=2.ckpt"}"'  # quoted: Hydra reads an unquoted = as an override
        run(compose_train(tiny_run_overrides(train, val, tmp_path / "again", resume=best_path)))


def test_save_total_limit_zero_keeps_every_checkpoint_whole(tmp_path: Path) -> None:
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "run"
    settings = {"trainer.max_steps": 3, "checkpoint.save_steps": 1, "checkpoint.save_total_limit": 0}
    run(compose_train(tiny_run_overrides(train, val, out, **settings)))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step=0.ckpt", "step=1.ckpt", "step=2.ckpt", "step=3.ckpt"]
    assert all("optimizer_states" in load_checkpoint(out / "checkpoints" / n) for n in names if n != "step=0.ckpt")


def test_cli_ckpt_path_of_another_model_is_one_message(tmp_path: Path, monkeypatch, capsys) -> None:
    from lit_embed import cli
    from lit_embed.models.tiny import build_tiny_bert

    monkeypatch.setattr(sys, "argv", ["lit-embed"])
    train, val, out = interrupted_run(tmp_path)
    other = build_tiny_bert(tmp_path / "wider", hidden_size=32, seed=0)
    args = ["fit", f"--config={REPO / 'conf' / 'cli' / 'full.yaml'}", f"--data.train_path={train}"]
    args += ["--data=lit_embed.data.datamodule.QAPairDataModule", f"--data.val_path={val}", "--data.batch_size=8"]
    args += [f"--model.encoder.init_args.model_name_or_path={other}", "--model.encoder.init_args.max_seq_length=128"]
    args += ["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--trainer.max_steps=6"]
    args += [f"--trainer.default_root_dir={tmp_path / 'cli'}", f"--ckpt_path={out / 'checkpoints' / 'last.ckpt'}"]
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "its weights do not fit this model" in err and "Traceback" not in err and len(err) < 1000


# --- the run's record ----------------------------------------------------------------------------------------


def test_finetune_keeps_the_composed_config_and_the_log_as_a_hydra_run_does(tmp_path: Path) -> None:
    import logging
    import re

    import yaml
    from omegaconf import OmegaConf

    import lit_embed
    from lit_embed.config import compose_config

    train, val = write_toy_data(tmp_path)
    out = tmp_path / "api"
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    lit_embed.finetune(
        str(train), str(val), model="tiny", batch_size=8, output_dir=str(out), overrides=["trainer=cpu", "seed=3"]
    )
    # The names a Hydra run's record has (hydra.yaml is Hydra's own job settings: there is no Hydra job here).
    assert sorted(p.name for p in (out / ".hydra").iterdir()) == ["config.yaml", "overrides.yaml"]
    overrides = yaml.safe_load((out / ".hydra" / "overrides.yaml").read_text())
    assert "seed=3" in overrides and f"output_dir={out}" in overrides and "model=tiny" in overrides
    # Reloaded, the config is the composed one, and composing its overrides again gives it back.
    saved = OmegaConf.load(out / ".hydra" / "config.yaml")
    assert saved.seed == 3 and saved.data.batch_size == 8 and saved.output_dir == str(out)
    assert OmegaConf.to_container(saved) == OmegaConf.to_container(compose_config(overrides))
    # train.log as Hydra's job logging writes it: every INFO line of the run.
    log = (out / "train.log").read_text().splitlines()
    line = r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\]\[lit_embed\.[\w.]+\]\[INFO\] - "
    assert any(re.match(line + r".*48 training pairs", entry) for entry in log)
    assert any(re.match(line + r"step 0: val/mrr@10", entry) for entry in log)
    assert root.handlers == handlers and root.level == level  # the caller's logging is as it was
