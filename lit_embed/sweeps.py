"""The summary table of a Hydra sweep (``python train.py -m ...``): one row per job, best first.

``SweepSummary`` (registered under ``hydra.callbacks`` in ``conf/train.yaml``) writes ``summary.md`` and
``summary.csv`` into the sweep's output_dir. Command line: ``python -m lit_embed.sweeps SWEEP_DIR`` writes them
for a sweep that was interrupted or is still running.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lit_embed.errors import LitEmbedError, reported
from lit_embed.evaluation import DEFAULT_METRIC, METRIC_TABLE_KEYS
from lit_embed.files import write_text_atomic

NOT_FINISHED = "no metrics.json: failed or still running"


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The sweep's job folders (the ones Hydra saved ``.hydra/overrides.yaml`` in), in job number order."""
    jobs = [path for path in sweep_dir.iterdir() if (path / ".hydra" / "overrides.yaml").is_file()]
    # The folders are named by job number (hydra.sweep.subdir); "10" sorts after "9", not after "1".
    return sorted(jobs, key=lambda path: (int(path.name) if path.name.isdigit() else sys.maxsize, path.name))


def read_overrides(job_dir: Path) -> dict[str, str]:
    """The job's command-line overrides as ``{key: value}``, values as written (``optimizer.lr=1e-5``)."""
    overrides = OmegaConf.to_container(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml"))
    return dict(override.split("=", 1) if "=" in override else (override, "") for override in overrides)


def sweep_metric(job_dir: Path) -> str:
    """The ``optimized_metric`` the job was configured with (``ndcg@10`` when it has none)."""
    config = job_dir / ".hydra" / "config.yaml"
    metric = OmegaConf.load(config).get("optimized_metric") if config.is_file() else None
    return metric or DEFAULT_METRIC


def summarize_sweep(sweep_dir: str | os.PathLike, sort_by: str | None = None) -> list[dict[str, Any]]:
    """Reads every job of a sweep: what was swept and the final validation metrics, best job first.

    Args:
        sweep_dir: the sweep's output_dir, which holds one folder per job.
        sort_by: the final metric to rank by, higher is better (None: the sweep's ``optimized_metric``).

    Returns:
        One row per job with the columns ``job``, each override whose value differs between jobs, ``sort_by``,
        the headline metrics, ``step`` and ``status`` (metrics are None where the job has none). Rows are sorted
        by ``sort_by``, best first; jobs without it follow in job order.
    """
    sweep_dir = Path(sweep_dir)
    jobs = job_dirs(sweep_dir) if sweep_dir.is_dir() else []
    if not jobs:
        raise LitEmbedError(
            f"{sweep_dir} holds no job folders of a Hydra sweep (<job>/.hydra/overrides.yaml). Pass the "
            "output_dir of a `python train.py -m ...` run."
        )
    sort_by = sort_by or sweep_metric(jobs[0])
    overrides = {job.name: read_overrides(job) for job in jobs}
    # Overrides every job shares (model=tiny, output_dir=...) say nothing about the differences between jobs.
    keys = dict.fromkeys(key for job_overrides in overrides.values() for key in job_overrides)
    swept = [key for key in keys if len({job_overrides.get(key) for job_overrides in overrides.values()}) > 1]
    metric_names = list(dict.fromkeys([sort_by, *METRIC_TABLE_KEYS]))
    rows = []
    for job in jobs:
        metrics_file = job / "metrics.json"
        metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else None
        final = (metrics or {}).get("final", {})
        rows.append(
            {
                "job": job.name,
                **{key: overrides[job.name].get(key, "") for key in swept},
                **{name: final.get(name) for name in metric_names},
                "step": final.get("step"),
                "status": NOT_FINISHED if metrics is None else "done" if final else "no validation set",
            }
        )
    # sorted() is stable: ties and the jobs without the metric keep their job order.
    return sorted(rows, key=lambda row: (row[sort_by] is None, -(row[sort_by] or 0.0)))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value).replace("|", "\\|")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`summarize_sweep` as a markdown table, padded so it also reads well in a terminal."""
    cells = [list(rows[0])] + [[_cell(value) for value in row.values()] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(value.ljust(width) for value, width in zip(values, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(values) for values in cells[1:])])


def csv_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`summarize_sweep` as CSV, metrics at full precision and missing values empty."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
    return out.getvalue()


def write_summary(sweep_dir: str | os.PathLike, sort_by: str | None = None) -> str:
    """Writes ``summary.md`` and ``summary.csv`` into ``sweep_dir`` (see :func:`summarize_sweep`); returns the table."""
    rows = summarize_sweep(sweep_dir, sort_by)
    table = markdown_table(rows)
    write_text_atomic(Path(sweep_dir) / "summary.md", table + "\n")
    write_text_atomic(Path(sweep_dir) / "summary.csv", csv_table(rows))
    return table


class SweepSummary(Callback):
    """Hydra callback: the summary table of a sweep, sorted by ``optimized_metric``; single runs are left alone."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        # Hydra skips on_multirun_end when a job fails (it re-raises the job's error once the batch is done), so
        # the files are also refreshed after each job: they then still show the failed job and all that finished.
        if config.hydra.mode == RunMode.MULTIRUN:
            write_summary(config.hydra.sweep.dir, config.get("optimized_metric"))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = write_summary(sweep_dir, config.get("optimized_metric"))
        print(f"Sweep summary, best first ({sweep_dir / 'summary.md'}, {sweep_dir / 'summary.csv'}):\n{table}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lit_embed.sweeps", description="Write the summary table of a `python train.py -m ...` sweep."
    )
    parser.add_argument("sweep_dir", help="the sweep's output_dir (one folder per job)")
    parser.add_argument("--sort-by", help="final metric to rank jobs by (default: the sweep's optimized_metric)")
    args = parser.parse_args(argv)
    with reported("lit_embed.sweeps"):
        print(write_summary(args.sweep_dir, args.sort_by))


if __name__ == "__main__":
    main()
