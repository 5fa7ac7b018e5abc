#!/bin/bash
# lit_embed on several GPU nodes with torchrun: start this same line on every node, with your settings after it
# (they go to the end of the train command). MASTER_ADDR is any one node's host name, reachable from the others:
#
#   MASTER_ADDR=node01 NNODES=2 GPUS_PER_NODE=8 bash examples/torchrun_nodes.sh \
#       data=qa_json data.train_path=/shared/train.json data.val_path=/shared/val.json
#
# The nodes meet at torchrun's c10d rendezvous (no node ranks to hand out). Give every node the same OUTPUT_DIR on
# shared storage; a job stopped by SIGTERM saves after the same step on every rank, and the same line started again
# continues it (resume=auto). The global batch is data.batch_size x GPUS_PER_NODE x NNODES.
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to the host name of one node, the same on every node}"
NNODES=${NNODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

# Stores on each node's own disk; see examples/slurm.sbatch for a shared cache.
torchrun --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE" --rdzv-backend=c10d \
    --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id="${RUN_ID:-lit-embed}" \
    -m lit_embed.train \
    trainer="${TRAINER:-ddp}" trainer.num_nodes="$NNODES" trainer.devices="$GPUS_PER_NODE" \
    data.cache_dir="${CACHE_DIR:-${TMPDIR:-/tmp}/lit_embed-cache}" output_dir="${OUTPUT_DIR:-runs/multinode}" \
    resume=auto "$@"
