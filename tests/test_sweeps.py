"""Sweep summaries: ``summarize_sweep`` on hand-written job folders; real ``train.py -m`` sweeps on the tiny model."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, tiny_run_overrides, write_toy_data
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf

from lit_embed.errors import LitEmbedError
from lit_embed.evaluation import METRIC_TABLE_KEYS
from lit_embed.sweeps import (
    FAILURE_FILE,
    NOT_FINISHED,
    SweepSummary,
    main,
    summarize_sweep,
    swept_keys,
    write_summary,
)


def write_job(sweep: Path, name: str, overrides: list[str], metrics: dict | None, optimized_metric: str = "") -> None:
    """A job folder as a sweep leaves it; ``metrics=None`` is a job that failed before writing metrics.json."""
    hydra_dir = sweep / name / ".hydra"
    hydra_dir.mkdir(parents=True)
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if optimized_metric:
        (hydra_dir / "config.yaml").write_text(yaml.safe_dump({"optimized_metric": optimized_metric}))
    if metrics is not None:
        (sweep / name / "metrics.json").write_text(json.dumps(metrics))


def final(ndcg: float, mrr: float) -> dict:
    metrics = {key: 0.5 for key in METRIC_TABLE_KEYS} | {"ndcg@10": ndcg, "mrr@10": mrr, "step": 8}
    return {"base": {key: 0.1 for key in METRIC_TABLE_KEYS}, "final": metrics}


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    """Four jobs over lr x batch size: two finished, one failed, one without validation; job 10 tests number order."""
    sweep = tmp_path / "sweep"
    shared = ["model=tiny", f"output_dir={sweep}"]
    write_job(sweep, "0", [*shared, "optimizer.lr=1e-5", "data.batch_size=32"], final(ndcg=0.5, mrr=0.9))
    write_job(sweep, "1", [*shared, "optimizer.lr=3e-5", "data.batch_size=32"], final(ndcg=0.7, mrr=0.6))
    write_job(sweep, "10", [*shared, "optimizer.lr=3e-5", "data.batch_size=64"], {})
    write_job(sweep, "2", [*shared, "optimizer.lr=1e-5", "data.batch_size=64"], None)
    return sweep


def test_summary_has_a_row_per_job_best_first_and_the_swept_overrides_as_columns(sweep: Path) -> None:
    rows = summarize_sweep(sweep, sort_by="ndcg@10")

    metrics = ["ndcg@10", *(key for key in METRIC_TABLE_KEYS if key != "ndcg@10")]  # the ranking metric first
    assert list(rows[0]) == ["job", "optimizer.lr", "data.batch_size", *metrics, "step", "status"]
    assert [row["job"] for row in rows] == ["1", "0", "2", "10"]  # unranked jobs follow in job number order
    assert rows[0]["optimizer.lr"] == "3e-5" and rows[0]["data.batch_size"] == "32"
    assert rows[0]["ndcg@10"] == 0.7 and rows[0]["mrr@10"] == 0.6 and rows[0]["step"] == 8
    assert [row["status"] for row in rows] == ["done", "done", NOT_FINISHED, "no validation set"]
    assert rows[2]["ndcg@10"] is None and rows[3]["step"] is None
    assert [row["job"] for row in summarize_sweep(sweep, sort_by="mrr@10")][:2] == ["0", "1"]


def test_summary_ranks_by_the_sweeps_optimized_metric(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    write_job(sweep, "0", ["optimizer.lr=1e-5"], final(ndcg=0.5, mrr=0.9), optimized_metric="mrr@10")
    write_job(sweep, "1", ["optimizer.lr=3e-5"], final(ndcg=0.7, mrr=0.6), optimized_metric="mrr@10")

    rows = summarize_sweep(sweep)
    assert [row["job"] for row in rows] == ["0", "1"]
    assert list(rows[0])[2] == "mrr@10"


def test_write_summary_writes_markdown_and_csv(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(sweep), "--sort-by", "ndcg@10"])

    table = (sweep / "summary.md").read_text()
    assert capsys.readouterr().out == table
    lines = table.splitlines()
    assert lines[0].startswith("| job | optimizer.lr | data.batch_size | ndcg@10 ")
    assert set(lines[1]) == {"|", "-"} and len({len(line) for line in lines}) == 1
    assert lines[2].startswith("| 1   | 3e-5 ") and "| 0.7000 " in lines[2]
    assert NOT_FINISHED in lines[4] and "no validation set" in lines[5]
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["optimizer.lr"], r["ndcg@10"], r["status"]) for r in rows] == [
        ("1", "3e-5", "0.7", "done"),
        ("0", "1e-5", "0.5", "done"),
        ("2", "1e-5", "", NOT_FINISHED),
        ("10", "3e-5", "", "no validation set"),
    ]
    assert sorted(p.name for p in sweep.iterdir() if p.is_file()) == ["summary.csv", "summary.md"]  # no temp files


def test_a_folder_without_jobs_is_an_error_that_names_it(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    with pytest.raises(LitEmbedError, match="holds no job folders"):
        write_summary(tmp_path / "missing")


def test_a_failed_job_gets_its_reason_and_the_swept_keys_are_columns_before_any_job_differs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    # Only the first job's folder exists, and it failed: the columns come from the sweep's own config.
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(
        yaml.safe_dump(
            {"hydra": {"overrides": {"task": ["model=tiny", "optimizer.lr=1e-5,3e-5", "data.batch_size=32,64"]}}}
        )
    )
    write_job(sweep, "0", ["model=tiny", "optimizer.lr=1e-5", "data.batch_size=32"], final(ndcg=0.5, mrr=0.9))
    # A rerun that failed leaves the metrics.json of the run before: the row must not rank with it.
    (sweep / "0" / FAILURE_FILE).write_text("train.json: only 20 training pairs,\nfewer than one batch.\n")

    rows = summarize_sweep(sweep)
    assert list(rows[0])[:4] == ["job", "optimizer.lr", "data.batch_size", "ndcg@10"]
    assert rows[0]["status"] == "failed: train.json: only 20 training pairs, fewer than one batch."
    assert rows[0]["ndcg@10"] is None and rows[0]["step"] is None


def test_swept_keys_are_the_sweeps_and_the_search_space_less_what_the_command_line_fixes() -> None:
    config = OmegaConf.create(
        {
            "hydra": {
                "overrides": {"task": ["model=tiny", "++data.x=1,2", "optimizer.lr=1e-3", "seed=range(1,3)"]},
                "sweeper": {
                    "params": {"optimizer.lr": "tag(log, interval(1e-6, 1e-4))", "data.batch_size": "choice(16, 32)"}
                },
            }
        }
    )
    assert swept_keys(config) == ["++data.x", "seed", "data.batch_size"]
    assert swept_keys(OmegaConf.create({})) == []


def test_the_callback_records_a_job_that_crashed(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    write_job(sweep, "0", ["data.batch_size=32"], final(ndcg=0.5, mrr=0.9))
    write_job(sweep, "1", ["data.batch_size=4096"], None)
    job_config = OmegaConf.create(
        {
            "optimized_metric": "ndcg@10",
            "hydra": {
                "mode": RunMode.MULTIRUN,
                "sweep": {"dir": str(sweep)},
                "runtime": {"output_dir": str(sweep / "1")},
                "job": {"num": 1},
            },
        }
    )
    crashed = JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("CUDA out of memory.\nTried 2 GiB"))

    SweepSummary().on_job_end(job_config, crashed)

    rows = read_csv(sweep / "summary.csv")
    assert [(row["job"], row["status"]) for row in rows] == [
        ("0", "done"),
        ("1", "failed: RuntimeError: CUDA out of memory. Tried 2 GiB"),
    ]


def run_sweep(
    tmp_path: Path, *overrides: str, returncode: int = 0, num_train: int = 48
) -> tuple[subprocess.CompletedProcess, Path]:
    """``python train.py -m`` on the tiny model and the toy data; ``overrides`` replace the fixed settings they name.

    The learning rate is always left to ``overrides`` (or to the search space).
    """
    train, val = write_toy_data(tmp_path, num_train=num_train)
    out = tmp_path / "sweep"
    fixed = tiny_run_overrides(train, val, out, load_best_model_at_end="false")
    swept = {"optimizer.lr", *(override.split("=", 1)[0] for override in overrides)}
    cmd = [sys.executable, "train.py", "-m", *(o for o in fixed if o.split("=", 1)[0] not in swept), *overrides]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == returncode, proc.stderr[-3000:]
    return proc, out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_train_py_sweep_trains_each_job_in_its_folder_and_summarizes_them(tmp_path: Path) -> None:
    proc, out = run_sweep(tmp_path, "optimizer.lr=1e-3,3e-3")

    finals = {}
    for job in ("0", "1"):
        assert (out / job / "model" / "model.safetensors").is_file()
        finals[job] = json.loads((out / job / "metrics.json").read_text())["final"]
    rows = read_csv(out / "summary.csv")
    assert sorted((row["job"], float(row["optimizer.lr"])) for row in rows) == [("0", 1e-3), ("1", 3e-3)]
    for row in rows:
        assert row["step"] == "4" and row["status"] == "done"
        assert [float(row[key]) for key in METRIC_TABLE_KEYS] == [finals[row["job"]][key] for key in METRIC_TABLE_KEYS]
    assert float(rows[0]["ndcg@10"]) >= float(rows[1]["ndcg@10"])
    table = (out / "summary.md").read_text()
    assert table.count("| done ") == 2 and "| 0.001 " in table and "| 0.003 " in table
    assert table in proc.stdout  # printed at the end of the sweep

    # The same sweep again into its folder is refused before anything there changes.
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    again = subprocess.run(proc.args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "holds a finished sweep (job 0, 1 finished)" in again.stderr
    assert "Traceback" not in again.stderr + again.stdout
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before

    # A sweep stopped before job 1 finished: resume=true finishes it and keeps job 0 as it was.
    shutil.rmtree(out / "1" / "model")
    (out / "1" / "metrics.json").unlink()
    job0 = {path: path.read_bytes() for path in (out / "0").rglob("*") if path.is_file()}
    resumed = subprocess.run(
        [*proc.args, "resume=true"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {path: path.read_bytes() for path in (out / "0").rglob("*") if path.is_file()} == job0
    assert [row["status"] for row in read_csv(out / "summary.csv")] == ["done", "done"]
    assert (out / "1" / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_optuna_sweep_runs_its_trials_and_summarizes_them(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    _, out = run_sweep(tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=2")

    values = [json.loads((out / job / "metrics.json").read_text())["final"]["ndcg@10"] for job in ("0", "1")]
    assert yaml.safe_load((out / "optimization_results.yaml").read_text())["best_value"] == max(values)
    rows = read_csv(out / "summary.csv")
    assert sorted(row["job"] for row in rows) == ["0", "1"] and "optimizer.lr" in rows[0]


@pytest.mark.slow
def test_a_job_that_fails_does_not_end_the_sweep(tmp_path: Path) -> None:
    # 48 training pairs: batch size 64 is a user error (fewer pairs than one batch) in two of the four jobs.
    proc, out = run_sweep(tmp_path, "optimizer.lr=1e-3,3e-3", "data.batch_size=8,64", returncode=2)

    rows = read_csv(out / "summary.csv")
    assert sorted(row["job"] for row in rows) == ["0", "1", "2", "3"]  # every job ran
    assert [row["data.batch_size"] for row in rows] == ["8", "8", "64", "64"]  # finished first, then failed
    for row in rows[:2]:
        assert row["status"] == "done" and (out / row["job"] / "model").is_dir()
    failed = [row["job"] for row in rows[2:]]
    for row in rows[2:]:
        assert row["status"].startswith("failed: ") and row["status"].endswith(
            "train.json: only 48 training pairs, fewer than one batch (data.batch_size=64). Add data or lower "
            "data.batch_size."
        )
        assert row["ndcg@10"] == "" and (out / row["job"] / FAILURE_FILE).is_file()
    assert (out / "summary.md").read_text() in proc.stdout  # printed at the end, failed rows included
    assert "Traceback" not in proc.stderr
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"lit-embed-train: error: 2 of 4 jobs failed (job {', '.join(failed)}): the status ")


@pytest.mark.slow
def test_a_sweep_whose_every_job_fails_still_has_its_table(tmp_path: Path) -> None:
    proc, out = run_sweep(tmp_path, "optimizer.lr=1e-3,3e-3", "data.batch_size=64", returncode=2)

    rows = read_csv(out / "summary.csv")
    assert [(row["job"], row["optimizer.lr"], row["status"][:8]) for row in rows] == [
        ("0", "0.001", "failed: "),
        ("1", "0.003", "failed: "),
    ]
    assert "Traceback" not in proc.stderr and "2 of 2 jobs failed" in proc.stderr


def test_a_single_run_still_ends_at_its_error(tmp_path: Path) -> None:
    train, val = write_toy_data(tmp_path)
    cmd = [sys.executable, "train.py", *tiny_run_overrides(train, val, tmp_path / "run", **{"data.batch_size": 64})]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / FAILURE_FILE).exists()


@pytest.mark.slow
def test_optuna_search_goes_on_after_a_failed_trial_and_ends_cleanly_when_all_fail(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    # Seeded: of three trials, some draw batch size 8 and finish, some draw 64 (fewer pairs than one batch) and fail.
    proc, out = run_sweep(
        tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=3", "data.batch_size=choice(8,64)", returncode=2
    )
    rows = read_csv(out / "summary.csv")
    assert sorted(row["job"] for row in rows) == ["0", "1", "2"]
    assert {(row["data.batch_size"], row["status"][:8]) for row in rows} == {("8", "done"), ("64", "failed: ")}
    assert list(rows[0])[1:3] == ["data.batch_size", "optimizer.lr"]  # the command line's, then the search space
    assert yaml.safe_load((out / "optimization_results.yaml").read_text())["best_params"]["data.batch_size"] == 8

    proc, out = run_sweep(
        tmp_path / "all", "hparams_search=optuna", "hydra.sweeper.n_trials=2", "data.batch_size=64", returncode=2
    )
    assert [row["status"][:8] for row in read_csv(out / "summary.csv")] == ["failed: ", "failed: "]
    assert "Traceback" not in proc.stderr and "2 of 2 jobs failed" in proc.stderr
