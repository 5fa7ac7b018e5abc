"""Two simulated nodes against one process: the same job, the same global batch, its time and its weights.

A tiny random-init BERT trains on the offline standard-library pairs for a few steps (SGD: the order in which the
nodes' gradients are summed moves AdamW's update by ~1e-6, see the README's Multi-node section), evaluates and
exports, as one process at batch ``2 x B`` and as two gloo nodes at batch ``B`` each with cross-device negatives:
launched by two ``torchrun --nnodes=2 --rdzv-backend=c10d`` launchers, and as two processes with the variables
``srun`` sets. It prints each run's wall time and the largest difference of the exported weights from one
process's. On one machine the nodes share its cores: this shows the nodes train the same model, not a speedup::

    python benchmarks/multinode.py --rounds 2
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NODES = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(commands: list[tuple[list[str], dict[str, str]]]) -> float:
    """Starts the commands side by side; the seconds until the last has ended (each must succeed)."""
    base = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    procs = [subprocess.Popen(cmd, cwd=REPO, env={**base, **env}, **output) for cmd, env in commands]
    outputs = [proc.communicate(timeout=1200)[0] for proc in procs]
    for proc, output in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            sys.exit(f"a run failed (exit {proc.returncode}):\n{output[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="times to run the three forms (default 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs a node takes a step (default 8)")
    parser.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    args = parser.parse_args()

    from safetensors.torch import load_file

    from lit_embed.models.tiny import build_tiny_bert

    root = Path(tempfile.mkdtemp(prefix="lit_embed-multinode-"))
    model = build_tiny_bert(root / "model", seed=0, dropout=0.0)  # no dropout: the nodes' masks differ from one's
    job = ["data=stdlib", "data.num_train=256", "data.num_val=64", f"model.model_name_or_path={model}"]
    job += ["model.max_seq_length=128", f"trainer.max_steps={args.steps}", "eval.evaluation_steps=2"]
    job += ["load_best_model_at_end=false", "merge.alphas=[1.0]", "optimizer._target_=torch.optim.SGD"]
    job += ["optimizer.lr=0.05"]
    nodes = ["trainer=ddp_cpu", "trainer.devices=1", f"trainer.num_nodes={NODES}", "loss.gather_across_devices=true"]
    nodes += [f"data.batch_size={args.batch_size}"]
    print(f"{'round':>5}  {'one process':>11}  {'torchrun':>8}  {'srun':>8}  max |weight diff| (torchrun, srun)")
    for r in range(args.rounds):
        out = {form: root / f"{form}{r}" for form in ("one", "torchrun", "srun")}
        one = [*job, "trainer=cpu", f"data.batch_size={NODES * args.batch_size}", f"output_dir={out['one']}"]
        single = run_all([([sys.executable, "train.py", *one, f"data.cache_dir={root / 'one'}"], {})])

        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={NODES}", "--nproc_per_node=1"]
        launcher += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "train.py"]
        each = [*job, *nodes, f"output_dir={out['torchrun']}"]
        torchrun = run_all([([*launcher, *each, f"data.cache_dir={root / f'node{n}'}"], {}) for n in range(NODES)])

        slurm = {"SLURM_NTASKS": str(NODES), "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "train"}
        slurm |= {"SLURM_JOB_ID": "1", "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": str(free_port())}
        each = [*job, *nodes, f"output_dir={out['srun']}"]
        srun = run_all(
            [
                (
                    [sys.executable, "train.py", *each, f"data.cache_dir={root / f'node{n}'}"],
                    {**slurm, "SLURM_PROCID": str(n), "SLURM_NODEID": str(n), "SLURM_LOCALID": "0"},
                )
                for n in range(NODES)
            ]
        )
        reference = load_file(out["one"] / "model" / "model.safetensors")
        diffs = []
        for form in ("torchrun", "srun"):
            weights = load_file(out[form] / "model" / "model.safetensors")
            diffs.append(max((weights[k] - reference[k]).abs().max().item() for k in reference))
        print(f"{r + 1:>5}  {single:>10.1f}s  {torchrun:>7.1f}s  {srun:>7.1f}s  {diffs[0]:.1e}, {diffs[1]:.1e}")
        if max(diffs) > 1e-6:
            sys.exit(f"the nodes' model differs from one process's by {max(diffs):.1e} (more than 1e-6)")


if __name__ == "__main__":
    main()
