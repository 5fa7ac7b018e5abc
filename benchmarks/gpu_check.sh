#!/usr/bin/env bash
# The prepared GPU check (under 8 minutes on one H100/H200): lit_embed against sentence-transformers' Trainer at
# bge-small's shape in bf16 -- batch 256 plain, the same with lit_embed's method.compile=true, and batch 4096 with the
# cached losses -- in one process each, then the GPU tests (-m gpu). Writes everything to one JSON file.
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]        # default: ./gpu_check
#
# The machine needs torch, lightning, sentence-transformers and transformers; lit_embed's other dependencies
# (hydra-core, omegaconf, torchmetrics, ...) are installed from $WHEELS (a folder of wheels) when missing, never from
# the network. GPU_CHECK_DEVICE=cpu runs the same steps on the CPU with a tiny model, to check the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"
mkdir -p "$out"
device="${GPU_CHECK_DEVICE:-cuda}"

if ! python -c "import hydra, omegaconf, torchmetrics" 2>/dev/null; then
    python -m pip install -q --no-index --find-links "${WHEELS:-wheels}" hydra-core omegaconf torchmetrics
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY' > "$out/device.json"
import json, torch, transformers, sentence_transformers, lightning
cuda = torch.cuda.is_available()
print(json.dumps({
    "device": torch.cuda.get_device_name() if cuda else "cpu",
    "torch": torch.__version__, "transformers": transformers.__version__,
    "sentence_transformers": sentence_transformers.__version__, "lightning": lightning.__version__,
    "flash_attn": __import__("importlib").util.find_spec("flash_attn") is not None,
}))
PY

if [ "$device" = cuda ]; then
    model=bge-arch; precision=bf16; plain=(--batch-size 256 --steps 40 --warmup 8); cached=(--batch-size 4096 --cached 128 --steps 7 --warmup 2)
    compiled=(--batch-size 256 --steps 30 --warmup 10)  # the warm-up steps pay the compilation
    sources=$(python -c "import site; print(site.getsitepackages()[0])")
else  # a dry run of the script itself
    model=tiny; precision=fp32; plain=(--batch-size 16 --steps 6 --warmup 2); cached=(--batch-size 32 --cached 8 --steps 5 --warmup 1)
    compiled=(--batch-size 16 --steps 6 --warmup 2)
    sources=$(python -c "import os, json; print(os.path.dirname(os.path.dirname(json.__file__)))")
fi
common=(--device "$device" --model "$model" --precision "$precision" --rounds 1 --no-evaluate --source-dir "$sources")
python benchmarks/throughput.py "${common[@]}" "${plain[@]}" --lit data.packing=true --json "$out/plain.json"
python benchmarks/throughput.py "${common[@]}" "${compiled[@]}" --lit data.packing=true --lit method.compile=true \
    --json "$out/compiled.json"
python benchmarks/throughput.py "${common[@]}" "${cached[@]}" --lit data.packing=true --json "$out/cached.json"

set +e
python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py --junitxml "$out/gpu_tests.xml" > "$out/gpu_tests.txt" 2>&1
tests_rc=$?
set -e
tail -n 3 "$out/gpu_tests.txt"

python - "$out" "$tests_rc" <<'PY'
import json, pathlib, sys
out, rc = pathlib.Path(sys.argv[1]), int(sys.argv[2])
results = {"device": json.loads((out / "device.json").read_text()), "gpu_tests_exit_status": rc}
for name in ("plain", "compiled", "cached"):
    run = json.loads((out / f"{name}.json").read_text())
    st, lit = run["sentence-transformers"], run["lit_embed"]
    results[name] = {
        "batch_size": run["args"]["batch_size"], "ratio": run["ratio"],
        "memory_ratio": lit["peak_memory_gib"] / st["peak_memory_gib"],
        "sentence_transformers": st, "lit_embed": lit,
    }
(out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
for name in ("plain", "compiled", "cached"):
    r = results[name]
    print(f"{name} (batch {r['batch_size']}): lit_embed / sentence-transformers {r['ratio']:.2f}x pairs/s (goal 10x), "
          f"peak memory {r['memory_ratio']:.2f}x (goal <= 0.5x)")
print(f"GPU tests exit status {rc}; results in {out / 'gpu_check.json'}")
PY
