"""Two nodes on one machine: ``torchrun --nnodes=2`` launchers meeting at a c10d rendezvous, and two processes with the
environment ``srun`` gives (Lightning's SLURMEnvironment), one gloo process a node. Each run trains with cross-device
negatives, evaluates sharded, checkpoints and exports one model, equal to one process on the same global batch;
with node-local caches each node builds its own stores, with a shared cache the job builds each store once."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, write_toy_data
from safetensors.torch import load_file

from lit_embed.models.tiny import build_tiny_bert

pytestmark = pytest.mark.slow  # two launchers and a reference run: about a minute on 2 cores
NODES = 2
PER_NODE_BATCH = 8


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multinode")
    train, val = write_toy_data(root)
    model = build_tiny_bert(root / "model", seed=0, dropout=0.0)  # no dropout: the nodes' masks differ from one's
    return {"root": root, "train": train, "val": val, "model": Path(model)}


def settings(job: dict[str, Path], output_dir: Path, batch_size: int) -> list[str]:
    return [
        "data=qa_json",
        f"data.train_path={job['train']}",
        f"data.val_path={job['val']}",
        f"data.batch_size={batch_size}",
        f"model.model_name_or_path={job['model']}",
        "model.max_seq_length=128",
        "trainer.max_steps=3",
        "eval.evaluation_steps=2",  # sharded evaluation during training too
        "load_best_model_at_end=false",  # the trained weights, whatever the toy metrics say
        "merge.alphas=[1.0]",  # ... and not merged back toward the base model
        # SGD: AdamW divides by the root of each weight's squared gradients, so a weight whose gradient is near 0
        # turns the reduction order of the nodes' gradients (1e-9) into differences of 1e-6; plain steps show the
        # nodes' gradients equal the one process's.
        "optimizer._target_=torch.optim.SGD",
        "optimizer.lr=0.05",
        f"output_dir={output_dir}",
    ]


def node_settings(job: dict[str, Path], output_dir: Path) -> list[str]:
    nodes = ["trainer=ddp_cpu", "trainer.devices=1", f"trainer.num_nodes={NODES}", "loss.gather_across_devices=true"]
    return settings(job, output_dir, PER_NODE_BATCH) + nodes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(commands: list[tuple[list[str], dict[str, str]]]) -> list[str]:
    """Starts every (command, environment) side by side and returns their output once all have ended."""
    base = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen(
            command, cwd=REPO, env={**base, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for command, env in commands
    ]
    try:
        outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    finally:  # a node that hangs waiting for the other must not outlive the test
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-4000:]
    return outputs


def torchrun_nodes(args: list[str], caches: list[Path]) -> list[str]:
    """``torchrun --nnodes=2 --nproc_per_node=1 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:PORT train.py ...``,
    one launcher a node, each with its own ``data.cache_dir`` (or the same)."""
    endpoint = f"--rdzv-endpoint=127.0.0.1:{free_port()}"
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={NODES}", "--nproc_per_node=1"]
    launcher += ["--rdzv-backend=c10d", endpoint, "train.py"]
    return launch([([*launcher, *args, f"data.cache_dir={cache}"], {}) for cache in caches])


def srun_nodes(args: list[str], caches: list[Path]) -> list[str]:
    """``srun --nodes=2 --ntasks-per-node=1 python train.py ...`` as the tasks see it: SLURM's variables."""
    slurm = {"SLURM_NTASKS": str(NODES), "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "train"}
    slurm |= {"SLURM_JOB_ID": "4242", "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": str(free_port())}
    return launch(
        [
            (
                [sys.executable, "train.py", *args, f"data.cache_dir={cache}"],
                {**slurm, "SLURM_PROCID": str(node), "SLURM_NODEID": str(node), "SLURM_LOCALID": "0"},
            )
            for node, cache in enumerate(caches)
        ]
    )


@pytest.fixture(scope="module")
def one_process(job: dict[str, Path]) -> dict[str, torch.Tensor]:
    """The same job in one process, on batches of both nodes' pairs."""
    out = job["root"] / "single"
    args = settings(job, out, NODES * PER_NODE_BATCH) + ["trainer=cpu", f"data.cache_dir={job['root'] / 'c'}"]
    launch([([sys.executable, "train.py", *args], {})])
    return load_file(out / "model" / "model.safetensors")


def assert_same_model(output_dir: Path, expected: dict[str, torch.Tensor]) -> None:
    trained = load_file(output_dir / "model" / "model.safetensors")
    for key, weights in expected.items():
        torch.testing.assert_close(trained[key], weights, atol=1e-6, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
    assert (output_dir / "metrics.json").is_file() and (output_dir / "checkpoints" / "last.ckpt").is_file()


def stores(cache: Path) -> list[str]:
    """The kinds of store in a cache folder (each has a lock file beside it, left out)."""
    return sorted(p.name.split("-")[0] for p in cache.iterdir() if not p.name.startswith("."))


def builds(outputs: list[str]) -> int:
    return sum(output.count("Building the") for output in outputs)


@pytest.mark.parametrize("launcher", [torchrun_nodes, srun_nodes], ids=["torchrun", "srun"])
def test_two_nodes_train_as_one_process_with_node_local_caches(job, one_process, launcher, tmp_path: Path) -> None:
    caches = [tmp_path / f"node{node}" for node in range(NODES)]  # each node's own disk
    outputs = launcher(node_settings(job, tmp_path / "run"), caches)
    assert_same_model(tmp_path / "run", one_process)
    for cache in caches:  # rows, query tokens, document tokens: each node builds the stores it reads
        assert stores(cache) == ["rows", "tokens", "tokens"]
    assert builds(outputs) == 3 * NODES
    assert "Traceback" not in "".join(outputs)


@pytest.mark.parametrize("launcher", [torchrun_nodes, srun_nodes], ids=["torchrun", "srun"])
def test_two_nodes_sharing_a_cache_build_each_store_once(job, one_process, launcher, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    outputs = launcher(node_settings(job, tmp_path / "run"), [shared] * NODES)
    assert_same_model(tmp_path / "run", one_process)
    assert stores(shared) == ["rows", "tokens", "tokens"]
    assert builds(outputs) == 3  # one build of each store for the whole job
