"""Retrieval metrics of any sentence-transformers model on a QA data file.

Command line: ``lit-embed-eval MODEL DATA [--json] [--batch-size N] [--truncate-dim N] [--index DIR]`` (or
``python -m lit_embed.evaluate``), where MODEL is a sentence-transformers directory, a run's ``model/`` or a run's
output directory, and DATA a file that ``data=qa_json`` reads (LlamaIndex ``.json``, ``.jsonl`` pairs, ...). The
numbers are the ones training logs as ``val/...``: same search, same prompts. With ``--index DIR`` the corpus is
embedded once into a Qdrant database in DIR and the queries are searched there
(:mod:`lit_embed.evaluation.vector_index`): the same metrics, from a vector database.

``lit-embed-eval RETRIEVER DATA --rerank RERANKER [--top-k K] [--json]`` scores the two-stage pipeline: the
retriever's top K for each query, reordered by a ``CrossEncoder`` (:mod:`lit_embed.evaluation.rerank`), beside the
first stage alone.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from lit_embed.console import quiet_third_party_output
from lit_embed.data.formats import load_dataset
from lit_embed.errors import LitEmbedError, reported
from lit_embed.evaluation.rerank import AT_K, FUSION_FILE, evaluate_pipeline, first_stage, read_fusion
from lit_embed.evaluation.retrieval import evaluate_encoder, format_metrics_table
from lit_embed.evaluation.vector_index import evaluate_with_index, import_qdrant
from lit_embed.models.encoder import Encoder
from lit_embed.models.model_folder import check_model_folder, loading_errors

# Candidates a reranker reads per query by default: what a CPU reranks in seconds for a few hundred queries.
DEFAULT_TOP_K = 20
RERANK_TABLE_KEYS = (f"mrr@{AT_K}", f"ndcg@{AT_K}", "map", f"recall@{AT_K}")


def model_directory(path: str | os.PathLike, what: str = "model") -> Path:
    """The model directory that ``path`` (``what`` the user set, for messages) names: ``path`` itself, or the
    ``model/`` of a run's output directory.

    What is there is checked as every tool checks a model (:func:`~lit_embed.models.model_folder.check_model_folder`).
    """
    path = Path(path)
    if not path.exists():  # local models only: a hub id would be a missing folder of the user's
        raise LitEmbedError(
            f"{what} {path} does not exist. Pass a sentence-transformers directory, a run's model/ or the run's output "
            "directory."
        )
    is_model = any((path / name).is_file() for name in ("modules.json", "config.json"))
    if path.is_dir() and not is_model and (path / "model").is_dir():
        return path / "model"
    if path.is_dir() and not is_model and (path / "checkpoints").is_dir():
        raise LitEmbedError(
            f"{path} is a run's output directory without a model/ yet. Export one of its checkpoints first with "
            f"`lit-embed-export {path / 'checkpoints' / 'last.ckpt'} {path / 'model'}`."
        )
    return path


def evaluate(
    model: str | os.PathLike,
    data: str | os.PathLike,
    batch_size: int = 64,
    device: str | None = None,
    truncate_dim: int | None = None,
    trust_remote_code: bool = False,
    index: str | os.PathLike | None = None,
    rebuild_index: bool = False,
) -> dict[str, float]:
    """Scores ``model`` (see :func:`model_directory`) on ``data`` with exact cosine search over its whole corpus.

    Args:
        model: a model directory or a run's output directory.
        data: queries, corpus and relevant documents, in any format :func:`~lit_embed.data.formats.load_dataset`
            reads.
        batch_size: texts per encoder call.
        device: where to run the model (None = the GPU if there is one, else the CPU).
        truncate_dim: score only the first this many embedding dimensions (None = all), as
            ``SentenceTransformer(model, truncate_dim=...)`` would embed.
        trust_remote_code: let the model directory run code from outside sentence-transformers.
        index: search a Qdrant local database in this folder instead of exact search: built from the corpus on the
            first call, reused by later calls with the same model and corpus (None = exact search).
        rebuild_index: replace an ``index`` built from another model or corpus.

    Returns:
        ``{"mrr@10": ..., "ndcg@10": ..., ...}``, as training logs them under ``val/``.
    """
    if index is not None:
        import_qdrant()  # before anything slow: a missing package is one message
    dataset = load_dataset(data)  # before the model, so a bad file fails fast
    path = model_directory(model)
    check_model_folder(path, trust_remote_code, what="model", fix="pass --trust-remote-code (trust_remote_code=True)")
    encoder = Encoder(path, trust_remote_code=trust_remote_code)
    encoder.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if index is not None:
        return evaluate_with_index(encoder, dataset, index, data, path, batch_size, truncate_dim, rebuild_index)
    return evaluate_encoder(encoder, dataset, batch_size, truncate_dim=truncate_dim)


def evaluate_reranking(
    retriever: str | os.PathLike,
    reranker: str | os.PathLike,
    data: str | os.PathLike,
    top_k: int = DEFAULT_TOP_K,
    batch_size: int = 64,
    device: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, dict[str, float]]:
    """Scores the two-stage pipeline on ``data``: ``retriever``'s top ``top_k`` for each query, reordered by
    ``reranker`` (a sentence-transformers ``CrossEncoder`` directory, or a run's output directory).

    Returns:
        ``{"retriever": metrics, "reranked": metrics, "pipeline": metrics}``
        (:func:`~lit_embed.evaluation.rerank.ranking_metrics`): the first stage alone; its candidates in the
        reranker's order, equal to sentence-transformers' ``CrossEncoderRerankingEvaluator`` on the same candidates
        with ``always_rerank_positives=False`` (a relevant document the retriever did not fetch stays missed); and
        the shipped pipeline, the order of the fused scores with the weight the reranker's run recorded in its
        ``fusion.json`` (the reranker's order when there is none), its ``weight`` among the metrics.
    """
    dataset = load_dataset(data)  # before the models, so a bad file fails fast
    retriever_path, reranker_path = model_directory(retriever), model_directory(reranker, "--rerank")
    fix = "pass --trust-remote-code (trust_remote_code=True)"
    check_model_folder(retriever_path, trust_remote_code, what="model", fix=fix)
    check_model_folder(reranker_path, trust_remote_code, what="--rerank", fix=fix)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = Encoder(retriever_path, trust_remote_code=trust_remote_code).to(device)
    candidates = first_stage(encoder, dataset, top_k, batch_size)
    del encoder
    from sentence_transformers import CrossEncoder

    with loading_errors(str(reranker_path), fix):
        model = CrossEncoder(str(reranker_path), device=device, trust_remote_code=trust_remote_code)

    def scorer(pairs: list[tuple[str, str]]) -> list[float]:  # logits: the fusion standardizes them itself
        return model.predict(
            pairs, batch_size=batch_size, show_progress_bar=False, activation_fn=torch.nn.Identity()
        ).tolist()

    weight = read_fusion(reranker_path)
    return evaluate_pipeline(candidates, dataset, scorer, fusion_weight=1.0 if weight is None else weight)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lit-embed-eval", description="Retrieval metrics (MRR, NDCG, MAP, accuracy/precision/recall@k) of a model."
    )
    parser.add_argument("model", help="a sentence-transformers directory, a run's model/ or a run's output directory")
    parser.add_argument("data", help="queries, corpus and relevant docs: LlamaIndex .json, .jsonl pairs, .csv, ...")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object instead of a table")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per encoder call (default: 64)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: the GPU if there is one)")
    parser.add_argument(
        "--truncate-dim",
        type=int,
        default=None,
        help="score only the first N embedding dimensions, e.g. a size trained with loss=matryoshka (default: all)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the model run code from outside sentence-transformers (custom module classes); only if you trust it",
    )
    parser.add_argument(
        "--index",
        metavar="DIR",
        help="evaluate through a vector database: embed the corpus once into a Qdrant local database in DIR "
        "(reused by later calls with the same model and corpus) and search it (pip install 'lit_embed[clients]')",
    )
    parser.add_argument(
        "--rebuild-index",
        action="store_true",
        help="with --index: replace an index built from another model or corpus, or an unfinished one",
    )
    parser.add_argument(
        "--rerank",
        metavar="RERANKER",
        help="score the two-stage pipeline: MODEL's top --top-k documents for each query, reordered by this "
        "sentence-transformers CrossEncoder directory (or a run's output directory); prints the first stage's "
        "metrics beside the reranked ones",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=DEFAULT_TOP_K,
        help=f"with --rerank: documents fetched by MODEL and read by the reranker for each query (default: "
        f"{DEFAULT_TOP_K}; each query costs that many reranker passes)",
    )
    args = parser.parse_args(argv)
    if args.rerank is not None and (args.index is not None or args.truncate_dim is not None):
        parser.error("--rerank searches exactly with the whole embedding: leave out --index and --truncate-dim")
    if args.top_k < 1:
        parser.error(f"--top-k must be at least 1, got {args.top_k}")
    if args.rebuild_index and args.index is None:
        parser.error("--rebuild-index needs --index DIR")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.truncate_dim is not None and args.truncate_dim < 1:
        parser.error(f"--truncate-dim must be at least 1, got {args.truncate_dim}")
    quiet_third_party_output()
    if args.rerank is not None:
        with reported("lit-embed-eval"):
            stages = evaluate_reranking(
                args.model, args.rerank, args.data, args.top_k, args.batch_size, args.device, args.trust_remote_code
            )
        if args.json:
            print(json.dumps(stages, indent=2))
            return
        print(format_metrics_table(stages, RERANK_TABLE_KEYS))
        weight = stages["pipeline"]["weight"]
        print(
            f"pipeline: {weight:g} * z(reranker) + {1 - weight:.2g} * z(retriever cosine) (the weight of the "
            f"reranker's {FUSION_FILE}, else 1)"
        )
        return
    with reported("lit-embed-eval"):
        metrics = evaluate(
            args.model,
            args.data,
            args.batch_size,
            args.device,
            args.truncate_dim,
            args.trust_remote_code,
            args.index,
            args.rebuild_index,
        )
    print(json.dumps(metrics, indent=2) if args.json else format_metrics_table({"value": metrics}))


if __name__ == "__main__":
    main()
