"""Every command in README.md runs, as written, in README order, on tiny settings.

Shell commands come from the ```bash / ```sh / ```console blocks (lines joined at a trailing backslash, comments
dropped, ``a && b`` split into two commands), Python snippets from the ```python blocks. A command is either run
here or listed in ``NOT_RUN`` with the reason; a new README command that is neither fails
``test_every_readme_command_is_run_or_listed``.

How a command is made tiny, without changing what it says:
- it runs in a folder of its own (``$HOME`` too, so caches land there) that holds the README's data files
  (``train.json``, ``val.json``, ...), written small, and links to ``train.py``, ``conf/`` and ``benchmarks/``;
- ``...`` (the README's "your other settings") becomes the settings of its first own-data run, ``DATA``;
- Hydra commands get ``TINY_HYDRA`` appended: a random-init model as wide as minilm (384, so ``loss.dims`` and
  ``--truncate-dim`` mean what they say), the CPU, two steps; ``model=`` given in the command is kept;
- the other tools get their tiny flags from ``TINY_FLAGS``.

The default run takes the commands in ``FAST``; ``test_readme_commands_slow`` (``-m slow``) runs them all.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fake_openai import FakeOpenAI
from helpers import REPO, toy_split, write_toy_data

from lit_embed.data.formats import save_llamaindex_json

README = REPO / "README.md"
# "...": the settings of the README's first run of your own data, so that resuming runs/mine resumes what it ran.
DATA = ["data=qa_json", "data.train_path=train.json", "data.val_path=val.json"]
TINY_MODEL = ["model=tiny", "++model.model_name_or_path.hidden_size=384"]
TINY_HYDRA = ["trainer=cpu", "trainer.max_steps=2"]
TINY_STDLIB = ["data.num_train=64", "data.num_val=16"]  # the default data, when the command names none
TINY_FLAGS = {
    "lit-embed-mine": ["--model", "{tiny}"],
    "lit-embed-score": ["--teacher", "{tiny}"],  # the tiny bi-encoder stands in for the cross-encoder
    "benchmarks/throughput.py": ["--model", "tiny", "--steps", "5", "--warmup", "1", "--rounds", "1"],
    "benchmarks/onnx_latency.py": ["--model", "{tiny}", "--repeats", "2", "--num-val", "50"],
    "benchmarks/multinode.py": ["--rounds", "1", "--steps", "2"],
    "lit-embed": [
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=2",
        "--model.init_args.encoder.init_args.model_name_or_path={tiny}",
    ],
}

# Commands that cannot run here, with the reason; matched against the command as the README writes it.
NOT_RUN = {
    "pip install torch==2.13.0": "installs from the network",
    "pip install -e .": "installs from the network; the package is installed for the tests already",
    'pip install -e ".[dev]"': "installs from the network",
    "python -m pytest": "the test suite itself",
    "python train.py trainer=ddp ...": "needs GPUs",
    "python train.py trainer=ddp loss.gather_across_devices=true ...": "needs GPUs",
    "sbatch examples/slurm.sbatch data=qa_json data.train_path=/shared/train.json data.val_path=/shared/val.json": (
        "needs SLURM; tests/test_multinode.py runs the script under a stand-in srun"
    ),
    "MASTER_ADDR=node01 NNODES=2 GPUS_PER_NODE=8 bash examples/torchrun_nodes.sh data=qa_json "
    "data.train_path=/shared/train.json": "needs 2 nodes of 8 GPUs; tests/test_multinode.py runs it as 2 local nodes",
    "pip install 'lit_embed[clients]'": "installs from the network",
    "# sentence-transformers 5.x with optimum-onnx (transformers<4.58), not this environment": "needs optimum-onnx, "
    "which cannot be installed next to transformers 5",
    "python train.py data=qa_json data.train_path=train.json eval.guard_path=general.json": "needs your "
    "general-domain QA file (the guard is tested in tests/test_recipe.py)",
    "pip install --no-deps --target /tmp/lif llama-index-finetuning==0.4.2": "installs from the network",
    "time PYTHONPATH=/tmp/lif python benchmarks/llamaindex_baseline.py data/c42/train.json data/c42/val.json "
    "--output-dir runs/li_c42": "needs llama-index-finetuning; minutes of training",
    "time python train.py data=qa_json data.train_path=data/c42/train.json data.val_path=data/c42/val.json "
    "output_dir=runs/le_c42": "the timing comparison: minutes of training",
    "lit-embed-eval runs/li_c42 data/c42/test.json": "scores the LlamaIndex run above",
    "lit-embed-eval runs/le_c42 data/c42/test.json": "scores the timed run above",
}
# A Python process with torch and Lightning takes seconds to start, so the default run (-m "not slow") takes the
# commands most likely to break and what they build on; test_readme_commands_slow runs every command. Keys are
# commands as the README writes them, or a Python snippet's first line.
FAST = {
    "python train.py data=qa_json data.train_path=train.json data.val_path=val.json output_dir=runs/mine",
    "lit-embed-eval runs/mine val.json --truncate-dim 128",
    "lit-embed-eval runs/mine val.json --rerank my-reranker --top-k 20",
    "python train.py task=rerank data=qa_json data.train_path=train.json data.val_path=val.json "
    "rerank.retriever=runs/mine/model output_dir=runs/reranker",
    "python -m lit_embed.export runs/mine/checkpoints/step=500.ckpt runs/step500-model",
    "from sentence_transformers import SentenceTransformer",
    "lit-embed-generate docs/ qa/ --llm http://localhost:8000/v1 --model Qwen/Qwen2.5-7B-Instruct",
    "python train.py -m data=qa_json data.train_path=train.json data.val_path=val.json optimizer.lr=1e-5,3e-5 "
    "data.batch_size=32,64 output_dir=runs/lr_bs",
}
# The OpenAI-compatible server the README's lit-embed-generate example asks: a fake one on 127.0.0.1 answers here.
README_LLM_URL = "http://localhost:8000/v1"
# The training pairs the workspace's train.json holds; a command whose batch is larger gets one that fills it.
WORKSPACE_PAIRS = 96


def readme_blocks(text: str) -> list[tuple[str, int, str]]:
    """``(language, line, body)`` of every fenced code block, indented ones (in list items) too."""
    pattern = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.S | re.M)
    return [
        (m.group(2), text[: m.start()].count("\n") + 1, re.sub(rf"(?m)^{m.group(1)}", "", m.group(3)))
        for m in pattern.finditer(text)
    ]


def shell_commands(body: str) -> list[str]:
    """The commands of a shell block, each as one line: continuations joined, comments dropped, ``&&`` split."""
    commands = []
    for line in re.sub(r"\\\n\s*", "", body).splitlines():
        tokens = shlex.split(line, comments=True, posix=False)
        while tokens:
            end = tokens.index("&&") if "&&" in tokens else len(tokens)
            commands.append(" ".join(tokens[:end]))
            tokens = tokens[end + 1 :]
    return commands


def readme_items() -> list[tuple[str, str, int]]:
    """``(kind, text, line)``, in README order: kind ``shell`` (one command) or ``python`` (one snippet)."""
    items = []
    for language, line, body in readme_blocks(README.read_text(encoding="utf-8")):
        if language in ("bash", "sh", "console"):
            items += [("shell", command, line) for command in shell_commands(body)]
        elif language == "python":
            items.append(("python", body, line))
    return items


def key(kind: str, text: str) -> str:
    return text.strip().splitlines()[0] if kind == "python" else text


def test_every_readme_command_is_run_or_listed() -> None:
    runnable = ("python train.py", "lit-embed-", "python -m lit_embed.", "lit-embed fit", "python benchmarks/")
    unknown = [
        f"README.md:{line}: {text}"
        for kind, text, line in readme_items()
        if key(kind, text) not in NOT_RUN and kind == "shell" and not text.startswith(runnable)
    ]
    assert not unknown, "run these in tests/test_readme.py or list them in NOT_RUN with the reason:\n" + "\n".join(
        unknown
    )
    listed = {key(kind, text) for kind, text, _ in readme_items()}
    assert not (set(NOT_RUN) | FAST) - listed, "NOT_RUN / FAST name commands the README no longer has"


def tiny_command(command: str, tiny_model: str) -> list[str]:
    """The README's command with the tiny settings added (see the module docstring)."""
    args = shlex.split(command)
    args = [arg for part in args for arg in (DATA if part == "..." else [part])]
    if args[:2] == ["python", "train.py"]:
        model = next((a for a in args if a.startswith("model=")), "model=tiny")
        extra = (TINY_MODEL if model == "model=tiny" else []) + TINY_HYDRA
        extra += [] if any(a.startswith("data=") for a in args) else TINY_STDLIB
        return [sys.executable, *args[1:], *extra]
    if args[0] == "python":
        args = [sys.executable, *args[1:]]
    tool = next((name for name in TINY_FLAGS if name in args[:2]), None)
    return args + [flag.format(tiny=tiny_model) for flag in TINY_FLAGS.get(tool, [])]


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    """A user's folder as the README assumes it: the repository's entry points and the data files it names."""
    from lit_embed.models.tiny import build_tiny_bert, build_tiny_cross_encoder

    root = tmp_path
    for name in ("train.py", "conf", "benchmarks"):
        (root / name).symlink_to(REPO / name)
    train, val = toy_split(WORKSPACE_PAIRS), toy_split(24, offset=1000)
    save_llamaindex_json(train, root / "train.json")
    save_llamaindex_json(val, root / "val.json")
    save_llamaindex_json(toy_split(48, offset=2000), root / "qa.json")
    with open(root / "triplets.jsonl", "w", encoding="utf-8") as f:
        for query_id, (doc_id, *_) in toy_split(48, offset=3000).relevant_docs.items():
            split = toy_split(48, offset=3000)
            row = {"query": split.queries[query_id], "positive": split.corpus[doc_id], "negatives": ["pass"]}
            f.write(json.dumps(row) + "\n")
    # Vectors "from a hosted API": one row per query and per document id of train.json and val.json.
    rng = np.random.default_rng(0)
    for name, ids in (("queries", [*train.queries, *val.queries]), ("docs", [*train.corpus, *val.corpus])):
        np.save(root / f"{name}.npy", rng.standard_normal((len(ids), 32)).astype(np.float32))
        (root / f"{name}.json").write_text(json.dumps(ids))
    build_tiny_bert(root / "tiny_model", seed=0, hidden_size=384)
    build_tiny_cross_encoder(root / "my-reranker", seed=0)  # a reranker of the user's
    # Documents for lit-embed-generate: a few guides of paragraphs, each with words of its own to ask about.
    (root / "docs").mkdir()
    letters = np.random.default_rng(0)
    for topic in ("sorting", "file handling", "json parsing", "path joining", "date formatting"):
        paragraphs = [
            f"The {topic} guide explains "
            + " ".join("".join(letters.choice(list("abcdefghijklmnopqrstuvwxyz"), 7)) for _ in range(30))
            + "."
            for _ in range(6)
        ]
        (root / "docs" / f"{topic.replace(' ', '_')}.md").write_text(f"# {topic}\n\n" + "\n\n".join(paragraphs))
    return root


def run_shell(command: str, root: Path) -> None:
    batch = max(map(int, re.findall(r"data\.batch_size=(\d+)", command)), default=0)
    if batch > WORKSPACE_PAIRS:  # e.g. 4096 pairs a batch needs 4096 pairs
        save_llamaindex_json(toy_split(batch), root / "train.json")
    if "step=500.ckpt" in command:
        # A run of 500 steps or more would have written it; the tiny run stops at step 2.
        checkpoints = root / "runs" / "mine" / "checkpoints"
        if not (checkpoints / "step=500.ckpt").exists():
            shutil.copy(checkpoints / "last.ckpt", checkpoints / "step=500.ckpt")
    if "resume=true" in command:
        shutil.rmtree(root / "runs" / "mine" / "model")  # resume is for a run that was stopped before its end
    env = {**os.environ, "HOME": str(root), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = tiny_command(command, str(root / "tiny_model"))
    with FakeOpenAI() as server:  # the LLM server of lit-embed-generate's example, on this machine
        args = [server.url if arg == README_LLM_URL else arg for arg in args]
        proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    try:
        assert proc.returncode == 0, (
            f"{command}\n(run as {shlex.join(args)})\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        )
    finally:
        if batch > WORKSPACE_PAIRS:
            save_llamaindex_json(toy_split(WORKSPACE_PAIRS), root / "train.json")


class FakeLLM:
    """The ``llm`` of the README's generation snippet: numbered questions, as real models answer."""

    def complete(self, prompt: str) -> FakeLLM:
        self.text = "1. What does this chunk define?\n2. Which value does it return?"
        return self


def run_python(snippet: str, root: Path) -> None:
    # A snippet of its own folder: the generation example writes train.json, which the commands after it read.
    folder = root / f"python_{abs(hash(snippet))}"
    folder.mkdir(exist_ok=True)
    for name in ("runs", "train.json", "val.json"):
        if not (folder / name).exists():
            (folder / name).symlink_to(root / name)
    (folder / "train.json").unlink()
    shutil.copy(root / "train.json", folder / "train.json")
    script = folder / "snippet.py"
    script.write_text(snippet)
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        runpy.run_path(str(script), init_globals={"chunks": ["def f():\n    return 1", "x = 2"], "llm": FakeLLM()})
    finally:
        os.chdir(cwd)


def run_readme(root: Path, slow: bool) -> None:
    """Runs the README's commands in its order, each after those it builds on: ``FAST``'s, or all (``slow``)."""
    for kind, text, line in readme_items():
        if key(kind, text) in NOT_RUN or not (slow or key(kind, text) in FAST):
            continue
        print(f"README.md:{line}: {key(kind, text)}", flush=True)
        run_shell(text, root) if kind == "shell" else run_python(text, root)


def test_readme_commands(workspace: Path) -> None:
    run_readme(workspace, slow=False)


@pytest.mark.slow
def test_readme_commands_slow(workspace: Path) -> None:
    run_readme(workspace, slow=True)


def readme_output_table() -> set[str]:
    """The top-level names in the README's table of what a run writes (``logs/version_0/metrics.csv`` -> ``logs``)."""
    text = README.read_text(encoding="utf-8")
    start = text.index("Everything a run writes goes under `output_dir`")
    section = text[start : text.index("\n## ", start)]
    return {path.split("/")[0] for path in re.findall(r"^\| `([^`]+)` \|", section, re.M)}


@pytest.mark.parametrize("method", ["full", "adapter", "lora"])
def test_the_output_table_names_every_file_a_run_writes(method: str, tmp_path: Path, monkeypatch) -> None:
    import lit_embed
    import lit_embed.train

    train, val = write_toy_data(tmp_path)
    out = tmp_path / "run"
    seen: set[str] = set()
    finish = lit_embed.train.finish

    def listing_finish(*args, **kwargs):  # what is there while the run still holds its folder (the lock)
        report = finish(*args, **kwargs)
        seen.update(os.listdir(out))
        return report

    monkeypatch.setattr(lit_embed.train, "finish", listing_finish)
    overrides = ["trainer=cpu", "trainer.max_steps=2"]
    overrides += ["method.encoder.cache_dir=null"] if method == "adapter" else []
    lit_embed.finetune(
        str(train), str(val), model="tiny", method=method, batch_size=8, output_dir=str(out), overrides=overrides
    )
    seen.update(os.listdir(out))
    assert {".lock", ".hydra", "train.log", "model", "metrics.json"} <= seen
    missing = sorted(seen - readme_output_table())
    assert not missing, f"README.md's table of what a run writes does not name {missing}: add a row for each"
