"""The summary table of a Hydra sweep (``python train.py -m ...``): one row per job, best first.

``SweepSummary`` (registered under ``hydra.callbacks`` in ``conf/train.yaml``) writes ``summary.md`` and
``summary.csv`` into the sweep's output_dir. Command line: ``python -m lit_embed.sweeps SWEEP_DIR`` writes them
for a sweep that was interrupted or is still running.

A job that fails does not end the sweep: :func:`sweep_job` records a user error (a
:class:`~lit_embed.errors.LitEmbedError`) in the job's folder (``failure.txt``), the callback records any other
exception Hydra caught, the remaining jobs run, the failed job's row says why, and the sweep exits 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lit_embed.errors import FinishedRunError, LitEmbedError, StoppedError, reported
from lit_embed.evaluation import DEFAULT_METRIC, METRIC_TABLE_KEYS
from lit_embed.files import write_text_atomic
from lit_embed.internals import failed_job_error

NOT_FINISHED = "no metrics.json: failed or still running"
FAILURE_FILE = "failure.txt"  # in a job's folder: why the job failed, one message
FAILED = "failed: "  # the status of a failed job starts with this, the message follows


def record_failure(job_dir: str | os.PathLike, reason: str) -> None:
    """Writes why a sweep's job failed into its folder, where :func:`summarize_sweep` finds it."""
    write_text_atomic(Path(job_dir) / FAILURE_FILE, reason.strip() + "\n")


@contextmanager
def sweep_job(job_dir: str | os.PathLike, log: logging.Logger) -> Iterator[None]:
    """Runs one job of a sweep: a user error inside is logged and recorded in ``job_dir``, not raised.

    One job's mistake (fewer pairs than its batch size, a NaN loss at its learning rate) must not end the jobs
    after it, as the ``SystemExit`` of a single run would. A stop by SIGTERM still ends the whole sweep with exit
    143, as it ends a single run: the scheduler that sent it wants all of it gone.
    """
    failure = Path(job_dir) / FAILURE_FILE
    failure.unlink(missing_ok=True)  # a job rerun in the same folder starts without its old failure
    try:
        yield
    except StoppedError:
        with reported("lit-embed-train", log):
            raise
    except FinishedRunError:
        # Only reached with resume=true (a new sweep into finished jobs is refused before it starts): the job
        # finished before the sweep was stopped, and its row keeps its metrics.
        log.info("%s finished before; kept as it is.", job_dir)
    except LitEmbedError as err:
        log.error("%s", err)
        record_failure(job_dir, str(err))


def swept_keys(multirun_config: DictConfig) -> list[str]:
    """The keys a sweep varies, from its config: sweeps on the command line, then ``hydra.sweeper.params``.

    ``optimizer.lr=1e-5,3e-5`` and Optuna's ``choice(16, 32)`` / ``interval(...)`` are sweeps; ``model=tiny`` is
    not, and a search-space key the command line fixes is not either. Known before any job ran, so the summary has
    these columns even when jobs fail or only one finished.
    """
    parser = OverridesParser.create()
    command_line = parser.parse_overrides(
        list(OmegaConf.select(multirun_config, "hydra.overrides.task", default=None) or [])
    )
    params = OmegaConf.select(multirun_config, "hydra.sweeper.params", default=None) or {}
    search_space = parser.parse_overrides([f"{key}={value}" for key, value in params.items()])
    fixed = {override.get_key_element() for override in command_line if not override.is_sweep_override()}
    keys = [override.get_key_element() for override in [*command_line, *search_space] if override.is_sweep_override()]
    return list(dict.fromkeys(key for key in keys if key not in fixed))


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


def summarize_sweep(
    sweep_dir: str | os.PathLike, sort_by: str | None = None, swept: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Reads every job of a sweep: what was swept and the final validation metrics, best job first.

    Args:
        sweep_dir: the sweep's output_dir, which holds one folder per job.
        sort_by: the final metric to rank by, higher is better (None: the sweep's ``optimized_metric``).
        swept: the keys the sweep varies (:func:`swept_keys`); None reads them from Hydra's ``multirun.yaml``
            in ``sweep_dir``, if there is one.

    Returns:
        One row per job with the columns ``job``, each swept key and each override whose value differs between
        jobs, ``sort_by``, the headline metrics, ``step`` and ``status`` (``done``, ``no validation set``, or
        ``failed: <why>``; metrics are None where the job has none). Rows are sorted by ``sort_by``, best first;
        jobs without it follow in job order.
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
    if swept is None:
        multirun_yaml = sweep_dir / "multirun.yaml"
        swept = swept_keys(OmegaConf.load(multirun_yaml)) if multirun_yaml.is_file() else []
    # Overrides every job shares (model=tiny, output_dir=...) say nothing about the differences between jobs.
    keys = dict.fromkeys(key for job_overrides in overrides.values() for key in job_overrides)
    differing = [key for key in keys if len({job_overrides.get(key) for job_overrides in overrides.values()}) > 1]
    swept = list(dict.fromkeys([*swept, *differing]))
    metric_names = list(dict.fromkeys([sort_by, *METRIC_TABLE_KEYS]))
    rows = []
    for job in jobs:
        metrics_file = job / "metrics.json"
        metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else None
        final = (metrics or {}).get("final", {})
        failure = job / FAILURE_FILE
        # A failure is newer than any metrics.json (a job removes its old failure.txt when it starts): a rerun that
        # failed ("already holds a finished model") must not rank with the metrics of the run before.
        if failure.is_file():
            final, status = {}, FAILED + " ".join(failure.read_text(encoding="utf-8").split())
        else:
            status = NOT_FINISHED if metrics is None else "done" if final else "no validation set"
        rows.append(
            {
                "job": job.name,
                **{key: overrides[job.name].get(key, "") for key in swept},
                **{name: final.get(name) for name in metric_names},
                "step": final.get("step"),
                "status": status,
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


def write_summary(
    sweep_dir: str | os.PathLike, sort_by: str | None = None, swept: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Writes ``summary.md`` and ``summary.csv`` into ``sweep_dir``; returns the rows of :func:`summarize_sweep`."""
    rows = summarize_sweep(sweep_dir, sort_by, swept)
    write_text_atomic(Path(sweep_dir) / "summary.md", markdown_table(rows) + "\n")
    write_text_atomic(Path(sweep_dir) / "summary.csv", csv_table(rows))
    return rows


def refuse_a_finished_sweep(config: DictConfig) -> None:
    """Stops a sweep into a folder whose jobs finished before Hydra rewrites its ``multirun.yaml``.

    Each job would be refused on its own (its folder holds a finished model), but only after the sweep's record
    was replaced by the refused sweep's; nothing of a finished sweep may change. ``overwrite=true`` replaces its
    models; ``resume=true`` finishes the jobs that did not finish.
    """
    sweep_dir = Path(config.hydra.sweep.dir)
    if config.get("overwrite") or config.get("resume") or not sweep_dir.is_dir():
        return
    finished = [job.name for job in job_dirs(sweep_dir) if (job / "model").exists()]
    if finished:
        with reported("lit-embed-train"):
            raise LitEmbedError(
                f"{sweep_dir} holds a finished sweep (job {', '.join(finished)} finished): choose another "
                "output_dir, set overwrite=true to replace its models, or resume=true to finish the jobs that did not."
            )


class SweepSummary(Callback):
    """Hydra callback: the summary table of a sweep, sorted by ``optimized_metric``; single runs are left alone.

    The sweep exits 0 when every job finished and 2 when any failed (its row says why).
    """

    def __init__(self) -> None:
        self.swept: list[str] | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        refuse_a_finished_sweep(config)
        # Hydra's sweepers write multirun.yaml or not (Optuna's does not); the keys are in the config either way.
        self.swept = swept_keys(config)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        if job_return.status == JobStatus.FAILED:
            # An exception that is not a user error (sweep_job records those): Hydra caught it and runs the next job.
            err = failed_job_error(job_return)
            record_failure(config.hydra.runtime.output_dir, f"{type(err).__name__}: {err}")
        # The files are refreshed after each job: a sweep that crashes or is killed still leaves its table.
        rows = write_summary(config.hydra.sweep.dir, config.get("optimized_metric"), self.swept)
        n_trials = OmegaConf.select(config, "hydra.sweeper.n_trials", default=None)
        if n_trials and config.hydra.job.num + 1 >= n_trials and all(row["status"] != "done" for row in rows):
            # Optuna ends a search in which no trial finished with its own traceback ("No trials are completed
            # yet"), before on_multirun_end; end it here, with the table and the message, as on_multirun_end would.
            self.on_multirun_end(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir, config.get("optimized_metric"), self.swept)
        print(f"Sweep summary, best first ({sweep_dir / 'summary.md'}, {sweep_dir / 'summary.csv'}):")
        print(markdown_table(rows))
        failed = [row["job"] for row in rows if row["status"].startswith(FAILED)]
        if failed:
            with reported("lit-embed-train"):
                raise LitEmbedError(
                    f"{len(failed)} of {len(rows)} jobs failed (job {', '.join(failed)}): the status column of "
                    f"{sweep_dir / 'summary.md'} and each job's train.log say why and what to change."
                )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lit_embed.sweeps", description="Write the summary table of a `python train.py -m ...` sweep."
    )
    parser.add_argument("sweep_dir", help="the sweep's output_dir (one folder per job)")
    parser.add_argument("--sort-by", help="final metric to rank jobs by (default: the sweep's optimized_metric)")
    args = parser.parse_args(argv)
    with reported("lit_embed.sweeps"):
        print(markdown_table(write_summary(args.sweep_dir, args.sort_by)))


if __name__ == "__main__":
    main()
