"""Every command-line tool refuses the same bad model paths the same way: one message naming the path, exit 2.

One list of bad paths (missing, not a model, custom code without --trust-remote-code, unreadable weights) and one list
of tools, each of which takes a model somewhere on its command line. The whole matrix runs in-process (each tool's
``main`` with ``sys.argv`` set, as its console script calls it); a few cases, and with ``-m slow`` the whole matrix,
run as the user runs them, in a subprocess, where a traceback would be printed.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import REPO, write_toy_data

from lit_embed.models.tiny import build_tiny_bert

# modeling_custom.py / configuration_custom.py of a model folder: importing them leaves IMPORTED behind.
SENTINEL = 'import pathlib\npathlib.Path(__file__).with_name("IMPORTED").touch()\n'
CUSTOM_POOLING = SENTINEL + "from sentence_transformers.sentence_transformer.modules import Pooling\n"


def bad_model_paths(root: Path, tiny_model: str) -> dict[str, Path]:
    """Paths a user might pass as a model, none of which is a usable one (or one to load without trusting it)."""
    paths = {"missing": root / "missing", "empty folder": root / "empty"}
    paths["empty folder"].mkdir()
    paths["text file"] = root / "notes.txt"
    paths["text file"].write_text("not a model\n")
    paths["stray config.json"] = root / "project"  # some other tool's config.json
    paths["stray config.json"].mkdir()
    (paths["stray config.json"] / "config.json").write_text(json.dumps({"name": "my project", "version": 2}))
    paths["broken config.json"] = root / "broken"
    paths["broken config.json"].mkdir()
    (paths["broken config.json"] / "config.json").write_text('{"model_type": "bert",')
    custom = paths["custom module class"] = root / "custom_module"
    shutil.copytree(tiny_model, custom)
    modules = json.loads((custom / "modules.json").read_text())
    modules[1]["type"] = "modeling_custom.Pooling"
    (custom / "modules.json").write_text(json.dumps(modules))
    (custom / "modeling_custom.py").write_text(CUSTOM_POOLING)
    # A Hugging Face model with its own code, shaped as a cross-encoder (what a teacher usually is).
    remote = paths["custom transformers code"] = root / "custom_transformers"
    remote.mkdir()
    config = {
        "model_type": "custombert",
        "architectures": ["CustomBertForSequenceClassification"],
        "auto_map": {
            "AutoConfig": "configuration_custom.CustomBertConfig",
            "AutoModel": "modeling_custom.CustomBertModel",
            "AutoModelForSequenceClassification": "modeling_custom.CustomBertForSequenceClassification",
        },
    }
    (remote / "config.json").write_text(json.dumps(config))
    for name in ("modeling_custom.py", "configuration_custom.py"):
        (remote / name).write_text(SENTINEL)
    garbage = paths["garbage weights"] = root / "garbage_weights"
    shutil.copytree(tiny_model, garbage)
    weights = garbage / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])  # a download cut short
    return paths


BAD = [  # the keys of bad_model_paths, for the test ids
    "missing",
    "empty folder",
    "text file",
    "stray config.json",
    "broken config.json",
    "custom module class",
    "custom transformers code",
    "garbage weights",
]


class Inputs:
    """The data files the tools read besides the model: good ones, so only the model can be wrong."""

    def __init__(self, root: Path) -> None:
        self.train, self.qa = write_toy_data(root, num_train=16, num_val=8)
        self.rows = root / "rows.jsonl"
        rows = [{"query": f"how do I do task {i}?", "positive": f"def task_{i}(): pass"} for i in range(4)]
        self.rows.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.retriever = build_tiny_bert(root / "retriever", seed=0)  # for a reranker's first stage


# tool -> (module whose main the console script calls, its arguments for MODEL, writing under WORK).
TOOLS: dict[str, tuple[str, Callable[[str, Path, Inputs], list[str]]]] = {
    "lit-embed-eval": ("lit_embed.evaluate", lambda m, w, i: [m, str(i.qa), "--device=cpu"]),
    "lit-embed-eval --rerank": (
        "lit_embed.evaluate",
        lambda m, w, i: [i.retriever, str(i.qa), "--rerank", m, "--device=cpu"],
    ),
    "lit-embed-export": ("lit_embed.export", lambda m, w, i: [m, str(w / "exported")]),
    "lit-embed-mine --model": (
        "lit_embed.mine",
        lambda m, w, i: [str(i.train), str(w / "mined.jsonl"), f"--model={m}"],
    ),
    "lit-embed-mine --teacher": (
        "lit_embed.mine",
        lambda m, w, i: [str(i.train), str(w / "mined.jsonl"), f"--teacher={m}"],
    ),
    "lit-embed-score --teacher": (
        "lit_embed.score",
        lambda m, w, i: [str(i.rows), str(w / "scored.jsonl"), "--teacher", m],
    ),
    "lit-embed-train": (
        "lit_embed.train",
        lambda m, w, i: [
            "data=qa_json",
            f"data.train_path={i.train}",
            "data.val_path=null",
            "trainer=cpu",
            f"model.model_name_or_path={m}",
            f"output_dir={w / 'run'}",
        ],
    ),
    "lit-embed fit": (
        "lit_embed.cli",
        lambda m, w, i: [
            "fit",
            f"--config={REPO / 'conf' / 'cli' / 'full.yaml'}",
            f"--model.encoder.init_args.model_name_or_path={m}",
            "--data=lit_embed.data.datamodule.QAPairDataModule",
            f"--data.train_path={i.train}",
            "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={w / 'run'}",
        ],
    ),
}


# A refused run of the Hydra app may leave its record of a new job's folder: .hydra/, marks such as .lock, train.log
# (see lit_embed.train.run); nothing a run makes (model/, checkpoints/, base_model/).
def hydra_record(path: str) -> bool:
    return path in ("run", "run/train.log") or path.startswith("run/.")


@pytest.fixture(scope="module")
def bad_paths(tmp_path_factory: pytest.TempPathFactory, tiny_model_path: str) -> dict[str, Path]:
    paths = bad_model_paths(tmp_path_factory.mktemp("bad_models"), tiny_model_path)
    assert list(paths) == BAD
    return paths


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    return Inputs(tmp_path_factory.mktemp("inputs"))


def written(work: Path) -> set[str]:
    """What is in ``work``, two levels deep."""
    return {str(p.relative_to(work)) for p in (*work.glob("*"), *work.glob("*/*"))}


def check_refused(tool: str, bad: str, path: Path, code: object, message: str, work: Path) -> None:
    assert code == 2, f"{tool} on {bad}: exit {code}\n{message}"
    assert "Traceback" not in message
    assert str(path) in message, f"{tool} on {bad}: the message does not name {path}:\n{message}"
    left = {p for p in written(work) if not (tool == "lit-embed-train" and hydra_record(p))}
    assert not left, f"{tool} on {bad} wrote {left}"
    assert not list(path.parent.rglob("IMPORTED")), f"{tool} on {bad} ran the model's code"


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("tool", list(TOOLS))
def test_every_tool_refuses_a_bad_model_path(
    tool: str,
    bad: str,
    bad_paths: dict[str, Path],
    inputs: Inputs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    module, args = TOOLS[tool]
    argv = args(str(bad_paths[bad]), tmp_path, inputs)
    if module == "lit_embed.train":  # in-process, Hydra must leave the test's logging as it is
        argv += ["hydra/job_logging=none", "hydra/hydra_logging=none"]
    monkeypatch.setattr(sys, "argv", [tool.split()[0], *argv])
    with pytest.raises(SystemExit) as exit_:  # anything else is what a user would see as a traceback
        importlib.import_module(module).main()
    streams = capsys.readouterr()
    message = streams.err + streams.out + caplog.text  # the apps that log their message log it
    check_refused(tool, bad, bad_paths[bad], exit_.value.code, message, tmp_path)


@pytest.mark.parametrize("tool", ["lit-embed-score --teacher", "lit-embed-mine --model"])
def test_a_hub_id_that_cannot_be_loaded_is_one_message(
    tool: str,
    inputs: Inputs,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A name that is no local path goes to the hub; offline (as here) or unknown there, the loader's error is ours."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, without retries
    module, args = TOOLS[tool]
    monkeypatch.setattr(sys, "argv", [tool.split()[0], *args("no-such-org/no-such-model", tmp_path, inputs)])
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main()
    message = capsys.readouterr().err + caplog.text
    assert exit_.value.code == 2 and "Traceback" not in message and not written(tmp_path)
    assert "could not load the model no-such-org/no-such-model" in message and "Check the hub id" in message


def run_tool(tool: str, path: Path, work: Path, inputs: Inputs) -> tuple[int, str]:
    module, args = TOOLS[tool]
    done = subprocess.run(
        [sys.executable, "-m", module, *args(str(path), work, inputs)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},  # a hub id fails at once, without retries
        timeout=300,
    )
    return done.returncode, done.stderr + done.stdout


@pytest.mark.parametrize(
    ("tool", "bad"),
    [
        ("lit-embed-score --teacher", "missing"),
        # Slower starts (the encoder's imports, Hydra): the in-process matrix above covers these tools.
        pytest.param("lit-embed-eval", "stray config.json", marks=pytest.mark.slow),
        pytest.param("lit-embed-train", "custom transformers code", marks=pytest.mark.slow),
    ],
)
def test_as_the_user_runs_them(tool: str, bad: str, bad_paths: dict[str, Path], inputs: Inputs, tmp_path: Path) -> None:
    code, output = run_tool(tool, bad_paths[bad], tmp_path, inputs)
    check_refused(tool, bad, bad_paths[bad], code, output, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("tool", list(TOOLS))
def test_every_tool_as_the_user_runs_it(
    tool: str, bad: str, bad_paths: dict[str, Path], inputs: Inputs, tmp_path: Path
) -> None:
    code, output = run_tool(tool, bad_paths[bad], tmp_path, inputs)
    check_refused(tool, bad, bad_paths[bad], code, output, tmp_path)
