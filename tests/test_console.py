"""What reaches the console: lit_embed's progress, results and warnings; no third-party tips or chatter."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import REPO, write_toy_data

from lit_embed.console import quiet_third_party_output
from lit_embed.training.callbacks.progress import ProgressBar, default_progress_bar, epoch_description

# Each was on the console of a default-style tiny run, its resume, an export, mining or evaluation.
THIRD_PARTY = {
    "Lightning's litlogger / litmodels tip": "💡 Tip",
    "torch's LeafSpec deprecation, via Lightning's CombinedLoader": "LeafSpec",
    "sentence-transformers' renamed get_sentence_embedding_dimension": "get_sentence_embedding_dimension",
    "Lightning on a mid-epoch resume of a loader it thinks is not resumable": "dataloader is not resumable",
    "Lightning on epochs shorter than log_every_n_steps": "log_every_n_steps",
    "transformers' weight-loading bar": "Loading weights",
    "transformers' weight-writing bar": "Writing model shards",
    "the logger's version in the progress bar": "v_num",
    "Lightning's 0-based epoch count": "Epoch 0/0",
    "any Python warning's category": "Warning:",
    "a traceback": "Traceback",
}


def run_command(args: list[str]) -> str:
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def assert_only_ours(command: str, output: str) -> None:
    leaked = [what for what, text in THIRD_PARTY.items() if text in output]
    assert not leaked, f"{command} printed {leaked}:\n{output}"


def tiny_run(tmp_path: Path) -> tuple[list[str], Path, Path]:
    """Overrides of a default-style tiny run, its output_dir and its validation file."""
    train, val = write_toy_data(tmp_path, num_train=32, num_val=12)
    out = tmp_path / "run"
    # 32 pairs in batches of 8: 4 batches an epoch, fewer than log_every_n_steps=5; step 2 is mid-epoch.
    overrides = [
        "model=tiny",
        "data=qa_json",
        "trainer=cpu",
        f"data.train_path={train}",
        f"data.val_path={val}",
        "data.batch_size=8",
        "model.max_seq_length=8",  # cuts the documents: lit_embed's own warning, which must still show
        "checkpoint.save_steps=2",
        "checkpoint.save_total_limit=0",
        f"output_dir={out}",
    ]
    return overrides, out, val


def assert_a_run_shows_ours(command: str, output: str) -> None:
    assert_only_ours(command, output)
    assert "[lit_embed.data.tokens][WARNING]" in output and "model.max_seq_length=8" in output
    assert "Epoch 1/" in output and "pairs/s" in output and "mrr@10" in output


def test_a_run_prints_only_ours(tmp_path: Path) -> None:
    overrides, _, _ = tiny_run(tmp_path)
    assert_a_run_shows_ours("train.py", run_command([sys.executable, "train.py", *overrides, "trainer.max_steps=3"]))


@pytest.mark.slow
def test_resume_export_mine_and_eval_print_only_ours(tmp_path: Path) -> None:
    overrides, out, val = tiny_run(tmp_path)
    run_command([sys.executable, "train.py", *overrides, "trainer.max_steps=3"])
    step2 = out / "checkpoints" / "step=2.ckpt"
    resumed = run_command(
        [sys.executable, "train.py", *overrides, "trainer.max_steps=4", f"resume='{step2}'", "overwrite=true"]
    )
    assert "Restored all states" in resumed
    assert_a_run_shows_ours("the resumed train.py", resumed)
    scripts = Path(sys.executable).parent
    exported = run_command([str(scripts / "lit-embed-export"), str(step2), str(tmp_path / "exported")])
    assert_only_ours("lit-embed-export", exported)
    mined = run_command(
        [str(scripts / "lit-embed-mine"), str(val), str(tmp_path / "mined.jsonl"), f"--model={tmp_path / 'exported'}"]
    )
    assert_only_ours("lit-embed-mine", mined)
    evaluated = run_command([str(scripts / "lit-embed-eval"), str(out), str(val)])
    assert_only_ours("lit-embed-eval", evaluated)
    assert "Wrote" in exported and "Mined" in mined and "mrr@10" in evaluated


def test_only_the_named_warnings_are_filtered() -> None:
    leaf_spec = "`isinstance(treespec, LeafSpec)` is deprecated, use ..."
    few_batches = "The number of training batches (4) is smaller than the logging interval Trainer(...)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party_output()
        for module, message in (
            ("lightning.pytorch.utilities._pytree", leaf_spec),
            ("lightning.pytorch.loops.fit_loop", few_batches),
            ("lit_embed.data.tokens", few_batches),
            ("some_package", leaf_spec),
            ("lightning.pytorch.loops.fit_loop", "something else Lightning has to say"),
        ):
            warnings.warn_explicit(message, UserWarning, f"{module}.py", 1, module=module)
    shown = sorted(w.filename for w in caught)
    assert shown == ["lightning.pytorch.loops.fit_loop.py", "lit_embed.data.tokens.py", "some_package.py"]


def test_the_bar_counts_epochs_from_one_and_hides_the_version() -> None:
    assert epoch_description(SimpleNamespace(max_epochs=1), 0) == "Epoch 1/1"
    assert epoch_description(SimpleNamespace(max_epochs=-1), 2) == "Epoch 3"
    trainer = SimpleNamespace(loggers=[SimpleNamespace(version=7)], progress_bar_metrics={"pairs/s": 9.5})
    assert ProgressBar().get_metrics(trainer, None) == {"pairs/s": 9.5}


@pytest.mark.parametrize(
    ("enabled", "callbacks", "bars"), [(None, [], 1), (True, [], 1), (False, [], 0), (True, [ProgressBar()], 0)]
)
def test_the_bar_is_added_unless_switched_off_or_brought(enabled: bool | None, callbacks: list, bars: int) -> None:
    assert len(default_progress_bar(enabled, callbacks)) == bars
