"""Two nodes on one machine: ``torchrun --nnodes=2`` launchers meeting at a c10d rendezvous, and two processes with the
environment ``srun`` gives (Lightning's SLURMEnvironment), one gloo process a node. Each run trains with cross-device
negatives, evaluates sharded, checkpoints and exports one model, equal to one process on the same global batch;
with node-local caches each node builds its own stores, with a shared cache the job builds each store once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, write_toy_data
from safetensors.torch import load_file

from lit_embed.models.tiny import build_tiny_bert

TESTS = {"PYTHONPATH": str(REPO / "tests")}  # helpers.SignalAt, for the preemption tests
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


def launch(commands: list[tuple[list[str], dict[str, str]]], ok: bool = True) -> list[str]:
    """Starts every (command, environment) side by side and returns their output once all have ended, each of which
    must have succeeded (``ok``) or failed."""
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
        assert (proc.returncode == 0) == ok, output[-4000:]
    return outputs


def torchrun_nodes(args: list[str], caches: list[Path], signal_node: list[str] = (), ok: bool = True) -> list[str]:
    """``torchrun --nnodes=2 --nproc_per_node=1 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:PORT train.py ...``,
    one launcher a node, each with its own ``data.cache_dir`` (or the same); node 1 also gets ``signal_node``."""
    endpoint = f"--rdzv-endpoint=127.0.0.1:{free_port()}"
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={NODES}", "--nproc_per_node=1"]
    launcher += ["--rdzv-backend=c10d", endpoint, "train.py"]
    extra = [[], list(signal_node)]
    return launch([([*launcher, *args, f"data.cache_dir={c}", *extra[n]], TESTS) for n, c in enumerate(caches)], ok)


def srun_nodes(args: list[str], caches: list[Path], signal_node: list[str] = (), ok: bool = True) -> list[str]:
    """``srun --nodes=2 --ntasks-per-node=1 python train.py ...`` as the tasks see it: SLURM's variables; node 1 also
    gets ``signal_node``."""
    slurm = {"SLURM_NTASKS": str(NODES), "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "train"}
    slurm |= {"SLURM_JOB_ID": "4242", "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": str(free_port())}
    extra = [[], list(signal_node)]
    return launch(
        [
            (
                [sys.executable, "train.py", *args, f"data.cache_dir={cache}", *extra[node]],
                {**TESTS, **slurm, "SLURM_PROCID": str(node), "SLURM_NODEID": str(node), "SLURM_LOCALID": "0"},
            )
            for node, cache in enumerate(caches)
        ],
        ok,
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


@pytest.mark.parametrize(
    ("launcher", "lock"),
    [(torchrun_nodes, "file"), (srun_nodes, "file"), (srun_nodes, "rank0")],
    ids=["torchrun", "srun", "srun-rank0"],
)
def test_two_nodes_sharing_a_cache_build_each_store_once(job, one_process, launcher, lock, tmp_path: Path) -> None:
    """Under an OS lock (shared storage that locks across nodes), or with rank 0 building while the other ranks wait
    (``data.cache_lock=rank0``, for storage that does not)."""
    shared = tmp_path / "shared"
    outputs = launcher([*node_settings(job, tmp_path / "run"), f"data.cache_lock={lock}"], [shared] * NODES)
    assert_same_model(tmp_path / "run", one_process)
    assert stores(shared) == ["rows", "tokens", "tokens"]
    assert builds(outputs) == 3  # one build of each store for the whole job
    if lock == "rank0":  # SLURM_PROCID=0 is node 0
        assert builds(outputs[:1]) == 3


@pytest.mark.parametrize(
    ("launcher", "signum"), [(torchrun_nodes, signal.SIGTERM), (srun_nodes, signal.SIGUSR1)], ids=["torchrun", "srun"]
)
def test_a_signal_on_one_node_stops_both_and_the_requeued_job_resumes_exactly(
    job, one_process, launcher, signum, tmp_path: Path
) -> None:
    """A preemption (SIGTERM) or SLURM's signal before the time limit (SIGUSR1) reaching only node 1: both nodes save
    after the same step and exit; the same command again (``resume=auto``) finishes the weights of one process."""
    scontrol = tmp_path / "bin" / "scontrol"  # SLURM's requeue, recorded
    scontrol.parent.mkdir()
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "requeued"}\n')
    scontrol.chmod(0o755)
    os.environ["PATH"] = f"{scontrol.parent}{os.pathsep}{os.environ['PATH']}"
    args, caches = [*node_settings(job, tmp_path / "run"), "resume=auto"], [tmp_path / "n0", tmp_path / "n1"]
    try:
        signal_node = ["+callbacks.preempt._target_=helpers.SignalAt", "+callbacks.preempt.step=1"]
        stopped = launcher(args, caches, [*signal_node, f"+callbacks.preempt.signum={int(signum)}"], ok=False)
    finally:
        os.environ["PATH"] = os.environ["PATH"].split(os.pathsep, 1)[1]
    assert all(f"stopped by {signum.name}" in output for output in stopped), stopped[0][-3000:]
    assert checkpoint_step(tmp_path / "run") == 2  # signalled during step 1: both nodes stop after step 2
    assert not (tmp_path / "run" / "model").exists()
    requeued = tmp_path / "requeued"
    assert (requeued.read_text() if requeued.exists() else "") == ("requeue 4242\n" if signum == signal.SIGUSR1 else "")

    launcher(args, caches)  # the requeued job: the same command
    assert_same_model(tmp_path / "run", one_process)


def test_a_signal_to_one_rank_of_lightnings_own_ddp_launcher_stops_both(job, one_process, tmp_path: Path) -> None:
    """One node, two ranks that Lightning's launcher started (``trainer=ddp_cpu``): SIGTERM to rank 1 alone, which
    Lightning's own handling leaves stopping while rank 0 waits in the next step, stops both after the same step."""
    args = settings(job, tmp_path / "run", PER_NODE_BATCH) + ["trainer=ddp_cpu", "loss.gather_across_devices=true"]
    args += ["resume=auto", f"data.cache_dir={tmp_path / 'cache'}"]
    signal_rank_1 = ["+callbacks.preempt._target_=helpers.SignalAt", "+callbacks.preempt.step=1"]
    (stopped,) = launch(
        [([sys.executable, "train.py", *args, *signal_rank_1, "+callbacks.preempt.rank=1"], TESTS)], False
    )
    assert "stopped by SIGTERM; the checkpoint is saved. Continue with the same command." in stopped
    assert checkpoint_step(tmp_path / "run") == 2
    launch([([sys.executable, "train.py", *args], TESTS)])
    assert_same_model(tmp_path / "run", one_process)


def checkpoint_step(output_dir: Path) -> int:
    """The step of the run's last.ckpt."""
    return int(torch.load(output_dir / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["global_step"])


FAKE_SRUN = """#!{python}
# srun as its tasks see it: one copy of the command a node (SLURM_JOB_NUM_NODES), each with its SLURM_PROCID.
import os, subprocess, sys
command = [a for a in sys.argv[1:] if not a.startswith("--")]
nodes = int(os.environ["SLURM_JOB_NUM_NODES"])
tasks = [
    subprocess.Popen(command, env=dict(os.environ, SLURM_NTASKS=str(nodes), SLURM_PROCID=str(n), SLURM_NODEID=str(n),
                                       SLURM_LOCALID="0"))
    for n in range(nodes)
]
sys.exit(max(task.wait() for task in tasks))
"""


def script_settings(job: dict[str, Path]) -> list[str]:
    """The tiny job's settings for an example script, which sets trainer, nodes, devices and output_dir itself."""
    tiny = settings(job, Path("unused"), PER_NODE_BATCH) + ["loss.gather_across_devices=true"]
    return [arg for arg in tiny if not arg.startswith("output_dir=")]


def test_the_example_job_scripts_train_two_simulated_nodes(job, one_process, tmp_path: Path) -> None:
    """examples/slurm.sbatch (under a stand-in for srun) and examples/torchrun_nodes.sh (started once a node), adapted
    to localhost only by their variables, each train the model one process trains."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "srun").chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    local = {"PATH": path, "TRAINER": "ddp_cpu", "MASTER_PORT": str(free_port())}

    sbatch = {"SLURM_JOB_NUM_NODES": str(NODES), "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "lit-embed"}
    sbatch |= {"SLURM_JOB_ID": "4243", "SLURM_NODELIST": "127.0.0.1", "OUTPUT_DIR": str(tmp_path / "slurm")}
    sbatch |= {"CACHE_DIR": str(tmp_path / "cache")}
    launch([(["bash", "examples/slurm.sbatch", *script_settings(job)], {**local, **sbatch})])
    assert_same_model(tmp_path / "slurm", one_process)

    nodes = {"MASTER_ADDR": "127.0.0.1", "NNODES": str(NODES), "GPUS_PER_NODE": "1", "RUN_ID": "test"}
    nodes |= {"OUTPUT_DIR": str(tmp_path / "torchrun"), "MASTER_PORT": str(free_port())}
    launch(
        [
            (["bash", "examples/torchrun_nodes.sh", *script_settings(job)], {**local, **nodes, "CACHE_DIR": str(cache)})
            for cache in (tmp_path / "node0", tmp_path / "node1")
        ]
    )
    assert_same_model(tmp_path / "torchrun", one_process)
