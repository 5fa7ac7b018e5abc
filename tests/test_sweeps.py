"""Sweep summaries: ``summarize_sweep`` on hand-written job folders; real ``train.py -m`` sweeps on the tiny model."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO, tiny_run_overrides, write_toy_data

from lit_embed.errors import LitEmbedError
from lit_embed.evaluation import METRIC_TABLE_KEYS
from lit_embed.sweeps import NOT_FINISHED, main, summarize_sweep, write_summary


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


def run_sweep(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    """``python train.py -m`` on the tiny model and the toy data, with the learning rate left to ``overrides``."""
    train, val = write_toy_data(tmp_path)
    out = tmp_path / "sweep"
    fixed = tiny_run_overrides(train, val, out, load_best_model_at_end="false")
    cmd = [sys.executable, "train.py", "-m", *(o for o in fixed if not o.startswith("optimizer.lr=")), *overrides]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
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


def test_optuna_sweep_runs_its_trials_and_summarizes_them(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    _, out = run_sweep(tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=2")

    values = [json.loads((out / job / "metrics.json").read_text())["final"]["ndcg@10"] for job in ("0", "1")]
    assert yaml.safe_load((out / "optimization_results.yaml").read_text())["best_value"] == max(values)
    rows = read_csv(out / "summary.csv")
    assert sorted(row["job"] for row in rows) == ["0", "1"] and "optimizer.lr" in rows[0]
