#!/usr/bin/env bash
# The negatives table of the README: MNRL, GIST, mined negatives, mined + GIST, and distillation from a finetuned
# teacher's scores, on one data folder (train.json, val.json; see benchmarks/retrieval_sets.py), MiniLM, CPU defaults.
#   bash benchmarks/negatives.sh runs/data/stdlib runs/negatives/stdlib
set -euo pipefail
data=$1 out=$2
mkdir -p "$out"
# The settings the table was measured with (before the default recipe and merging): 1 epoch, batch 16, lr 2e-5.
train() {
    name=$1; shift
    python train.py data=qa_json data.val_path="$data/val.json" output_dir="$out/$name" \
        trainer.max_epochs=1 data.batch_size=16 optimizer.lr=2e-5 'merge.alphas=[1.0]' "$@"
}
train mnrl data.train_path="$data/train.json"
train gist data.train_path="$data/train.json" loss=gist
lit-embed-mine "$data/train.json" "$out/mined.jsonl" --num-negatives 1 --relative-margin 0.05
train mined data.train_path="$out/mined.jsonl"
train mined_gist data.train_path="$out/mined.jsonl" loss=gist
lit-embed-score "$out/mined.jsonl" "$out/scored.jsonl" --teacher "$out/mnrl/model"
train margin_mse data.train_path="$out/scored.jsonl" loss=margin_mse
for run in mnrl gist mined mined_gist margin_mse; do
    python -c "import json, sys; m = json.load(open(sys.argv[1])); print(sys.argv[2], 'MRR@10 %.4f -> %.4f' % (m['base']['mrr@10'], m['final']['mrr@10']))" "$out/$run/metrics.json" "$run"
done
