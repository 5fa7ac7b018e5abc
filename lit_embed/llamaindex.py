"""Drop-in replacements for LlamaIndex's finetuning engines (embeddings, adapters, cross-encoders), with lit_embed
underneath.

A notebook written for ``llama_index.finetuning`` runs after one changed import line::

    from lit_embed.llamaindex import EmbeddingQAFinetuneDataset, SentenceTransformersFinetuneEngine
    from lit_embed.llamaindex import CrossEncoderFinetuneEngine, CrossEncoderFinetuningDatasetSample

The engines take LlamaIndex's constructor arguments, ``finetune()`` and ``get_finetuned_model()``, write the data
as LlamaIndex JSON and run lit_embed's Hydra job with overrides mapped from the arguments (README, "Coming from
LlamaIndex", has the table). The finetuned model ends up at ``model_output_path``, where LlamaIndex's engines put
it; lit_embed's run folder (data files, ``metrics.json``, checkpoints, logs, ``.hydra/``) sits beside it as
``<model_output_path>-run`` unless ``run_dir`` says otherwise.

Nothing here imports LlamaIndex, torch or Lightning until an engine needs them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_embed.internals import llamaindex_adds_residual, llamaindex_prompts

__all__ = [
    "CrossEncoderFinetuneEngine",
    "CrossEncoderFinetuningDatasetSample",
    "EmbeddingAdapterFinetuneEngine",
    "EmbeddingQAFinetuneDataset",
    "SentenceTransformersFinetuneEngine",
]

# train_model's keywords that LlamaIndex's adapter engine passes through **train_kwargs (the rest it sets itself).
ADAPTER_TRAIN_KWARGS = ("steps_per_epoch", "optimizer_class", "optimizer_params", "max_grad_norm", "show_progress_bar")


@dataclass
class EmbeddingQAFinetuneDataset:
    """LlamaIndex's ``EmbeddingQAFinetuneDataset``, whose home (``llama-index-finetuning``) no longer imports.

    The same fields, ``from_json`` and ``save_json``; the engines also take LlamaIndex's own class, lit_embed's
    ``QADataset`` or the path of any file lit_embed reads.
    """

    queries: dict[str, str]
    corpus: dict[str, str]
    relevant_docs: dict[str, list[str]]
    mode: str = "text"

    @property
    def query_docid_pairs(self) -> list[tuple[str, list[str]]]:
        """(query text, relevant document ids) for every query."""
        return [(query, self.relevant_docs[query_id]) for query_id, query in self.queries.items()]

    def save_json(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "queries": self.queries,
                    "corpus": self.corpus,
                    "relevant_docs": self.relevant_docs,
                    "mode": self.mode,
                },
                f,
                indent=4,
            )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> EmbeddingQAFinetuneDataset:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return cls(data["queries"], data["corpus"], data["relevant_docs"], data.get("mode", "text"))


@dataclass
class _Run:
    """One lit_embed job: its folder, the overrides it runs with and the data files it writes first."""

    run_dir: Path
    overrides: list[str]
    data: dict[str, Any] = field(default_factory=dict)  # file name in run_dir -> dataset to write there
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # file name -> JSONL rows to write there

    def claim(self) -> None:
        """Takes the run folder (new, empty or a run's, and marked as one) before any file goes into it."""
        from lit_embed.training.lifecycle import check_run_folder, mark_run_folder

        check_run_folder(self.run_dir)
        mark_run_folder(self.run_dir)

    def __call__(self, extra: Sequence[str] = ()) -> dict[str, Any]:
        from lit_embed.config import compose_config
        from lit_embed.data.formats import save_llamaindex_json
        from lit_embed.files import write_text_atomic
        from lit_embed.train import run
        from lit_embed.training.lifecycle import composed_record

        self.claim()  # the data files go in first
        for name, dataset in self.data.items():
            save_llamaindex_json(dataset, self.run_dir / name)
        for name, rows in self.rows.items():
            write_text_atomic(self.run_dir / name, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        overrides = [*self.overrides, *extra]
        cfg = compose_config(overrides)
        return run(cfg, hydra_record=composed_record(cfg, overrides))


class SentenceTransformersFinetuneEngine:
    """LlamaIndex's ``SentenceTransformersFinetuneEngine``: full finetuning of a sentence-transformers model.

    Args:
        dataset: the training data: an ``EmbeddingQAFinetuneDataset`` (LlamaIndex's or this module's), a
            ``QADataset``, or the path of a file lit_embed reads (``.json``, ``.jsonl``, ``.csv``, ...).
        model_id: the model to finetune, a hub id or a sentence-transformers directory
            (``model.model_name_or_path``, with the model's own sequence length and prompts).
        model_output_path: where the finetuned sentence-transformers model is written (lit_embed's
            ``model/``, copied there); the run folder is ``<model_output_path>-run``.
        batch_size: ``data.batch_size``.
        val_dataset: validation data, as ``dataset`` (``data.val_path``): evaluated before, during and after
            training, and the best evaluated step is the model kept (as sentence-transformers' ``fit`` does).
        loss: None (MNRL, as LlamaIndex), a sentence-transformers ``MultipleNegativesRankingLoss`` or
            ``CachedMultipleNegativesRankingLoss`` (mapped with their scale and mini-batch size; their model is
            not used), or the name of a lit_embed loss config (``"gist"``, ``"matryoshka"``, ...).
        epochs: ``trainer.max_epochs``.
        show_progress_bar: ``trainer.enable_progress_bar``.
        evaluation_steps: ``eval.evaluation_steps``.
        use_all_docs: ``data.use_all_docs``.
        trust_remote_code: ``model.trust_remote_code``.
        device: ``"cpu"`` (``trainer=cpu``), ``"cuda"``/``"cuda:N"`` (``trainer.accelerator=gpu`` on that GPU),
            ``"mps"``; None picks the GPU when there is one.
        save_checkpoints: with True, ``checkpoint_save_steps`` and ``checkpoint_save_total_limit`` map to
            ``checkpoint.save_steps`` / ``checkpoint.save_total_limit``; the checkpoints go to the run folder's
            ``checkpoints/``. With False lit_embed still keeps ``last.ckpt`` (and the best step's weights) there.
        resume_from_checkpoint: ``resume=true`` when ``finetune()`` finds a ``last.ckpt`` in the run folder
            (an interrupted run's); else a fresh start, as in LlamaIndex.
        checkpoint_save_steps: see ``save_checkpoints``.
        checkpoint_save_total_limit: see ``save_checkpoints`` (0 keeps every checkpoint, as in LlamaIndex).
        run_dir: lit_embed's run folder (not a LlamaIndex argument).
        overrides: further lit_embed overrides, ``key=value`` as on the command line (not a LlamaIndex argument).

    Learning rate, warmup (10%) and weight decay are lit_embed's defaults, which are sentence-transformers'.
    """

    def __init__(
        self,
        dataset: Any,
        model_id: str = "BAAI/bge-small-en",
        model_output_path: str = "exp_finetune",
        batch_size: int = 10,
        val_dataset: Any | None = None,
        loss: Any | None = None,
        epochs: int = 2,
        show_progress_bar: bool = True,
        evaluation_steps: int = 50,
        use_all_docs: bool = False,
        trust_remote_code: bool = False,
        device: Any | None = None,
        save_checkpoints: bool = False,
        resume_from_checkpoint: bool = False,
        checkpoint_save_steps: int = 500,
        checkpoint_save_total_limit: int = 0,
        *,
        run_dir: str | os.PathLike | None = None,
        overrides: Sequence[str] = (),
    ) -> None:
        self.dataset = dataset
        self.val_dataset = val_dataset
        self.model_id = model_id
        self.model_output_path = model_output_path
        self.run_dir = _run_dir(model_output_path, run_dir)
        data, paths = _data_files(self.run_dir, {"train.json": dataset, "val.json": val_dataset})
        args = ["model=minilm", "data=qa_json", *_device_overrides(device), *_loss_overrides(loss)]
        args += _values(
            {
                "model.model_name_or_path": str(model_id),
                "model.max_seq_length": None,  # the model's own, as SentenceTransformer(model_id) has it
                "model.trust_remote_code": trust_remote_code,
                "data.train_path": paths["train.json"],
                "data.val_path": paths["val.json"],
                "data.batch_size": batch_size,
                "data.use_all_docs": use_all_docs,
                "trainer.max_epochs": epochs,
                "optimizer.lr": 2e-5,  # sentence-transformers' fit default, which LlamaIndex's engine trains with
                "++trainer.enable_progress_bar": show_progress_bar,
                "eval.evaluation_steps": evaluation_steps,
                "output_dir": str(self.run_dir),
                "overwrite": True,  # as LlamaIndex's engine, a new finetune() replaces the model it wrote before
                **_without_validation(val_dataset),
            }
        )
        if save_checkpoints:
            args += _values(
                {
                    "checkpoint.save_steps": checkpoint_save_steps,
                    "checkpoint.save_total_limit": checkpoint_save_total_limit,
                }
            )
        self.resume_from_checkpoint = resume_from_checkpoint
        self.overrides = [*args, *overrides]
        self._run = _Run(self.run_dir, self.overrides, data)
        self.metrics: dict[str, Any] = {}

    def finetune(self, **train_kwargs: Any) -> None:
        """Runs lit_embed, then puts the finetuned model at ``model_output_path``; ``metrics`` holds
        ``metrics.json``'s content. LlamaIndex's ``finetune`` ignores its keyword arguments too."""
        # Decided now, not when the engine was made: an interrupted finetune() leaves a checkpoint to resume.
        resume = self.resume_from_checkpoint and (self.run_dir / "checkpoints" / "last.ckpt").is_file()
        self.metrics = self._run(["resume=true"] if resume else [])
        _copy_directory(self.run_dir / "model", Path(self.model_output_path))

    def get_finetuned_model(self, **model_kwargs: Any) -> Any:
        """A LlamaIndex ``HuggingFaceEmbedding`` of the finetuned model (``model_kwargs`` go to it), whose query and
        text embeddings are the model's ``encode_query`` / ``encode_document``. Without
        ``llama-index-embeddings-huggingface`` installed: the model's path, for ``SentenceTransformer(path)``."""
        path = str(self.model_output_path)
        try:
            from llama_index.embeddings.huggingface import HuggingFaceEmbedding
        except ImportError:
            return path
        # HuggingFaceEmbedding replaces the model's prompts with its instructions ("" unless given): pass the saved
        # prompts as instructions, so queries and texts are embedded as in training.
        from lit_embed.models.prompts import prompt_for, saved_prompts

        prompts = saved_prompts(path)
        instructions = {
            "query_instruction": prompt_for(prompts, "query"),
            "text_instruction": prompt_for(prompts, "document"),
        }
        kwargs = {k: v for k, v in instructions.items() if v} | model_kwargs
        return HuggingFaceEmbedding(model_name=path, **kwargs)


class EmbeddingAdapterFinetuneEngine:
    """LlamaIndex's ``EmbeddingAdapterFinetuneEngine``: a linear or two-layer head on a frozen embedding model.

    Runs lit_embed's ``method=adapter`` and writes the head at ``model_output_path`` in LlamaIndex's format
    (``config.json`` + ``pytorch_model.bin``), so ``AdapterEmbeddingModel(embed_model, model_output_path)``
    loads it; the run folder (``<model_output_path>-run``) also holds ``model/``, the base model with the head
    as one sentence-transformers directory.

    Args:
        dataset: the training data, as for :class:`SentenceTransformersFinetuneEngine`.
        embed_model: a LlamaIndex ``HuggingFaceEmbedding`` (its ``model_name``, ``max_length`` and query/text
            instructions become lit_embed's ``model.model_name_or_path``, ``model.max_seq_length`` and prompts),
            or a model name or path (a string). Any other LlamaIndex embedding (a hosted API) embeds every query
            and document of the data once, at ``finetune()``, into the run folder's ``query_embeddings.npy`` and
            ``document_embeddings.npy``, and the head trains on those (``model=precomputed``); the run folder's
            ``model/`` then holds the head alone.
        batch_size: ``data.batch_size``.
        epochs: ``trainer.max_epochs``.
        adapter_model: None (a ``LinearLayer``, ``adapter=linear``), a fresh LlamaIndex ``LinearLayer`` (its
            ``bias``) or ``TwoLayerNN`` (``adapter=mlp`` with its hidden size, activation and residual). Its
            weights are not used: lit_embed starts a linear head from the identity and an MLP from its own
            seeded random init (the residual weight at 0, as LlamaIndex's); an adapter that already trained is
            refused. Heads that change the size are refused (LlamaIndex maps queries only).
        dim: ignored (lit_embed reads the size from the model).
        device: as for :class:`SentenceTransformersFinetuneEngine`.
        model_output_path: where the adapter is written in LlamaIndex's format.
        model_checkpoint_path: given, ``checkpoint_save_steps`` maps to ``checkpoint.save_steps``; the
            checkpoints go to the run folder's ``checkpoints/``.
        checkpoint_save_steps: see ``model_checkpoint_path``.
        verbose: ``trainer.enable_progress_bar``.
        bias: ``adapter.bias`` of the default linear head.
        val_dataset: validation data (``data.val_path``; not a LlamaIndex argument): metrics before and after,
            and the best evaluated step is kept.
        run_dir: lit_embed's run folder (not a LlamaIndex argument).
        overrides: further lit_embed overrides (not a LlamaIndex argument).
        **train_kwargs: what LlamaIndex passes to its ``train_model``: ``optimizer_params`` (each key an
            ``optimizer.`` setting, e.g. ``{"lr": 2e-5}``), ``optimizer_class`` (``optimizer._target_``),
            ``max_grad_norm`` (``trainer.gradient_clip_val``), ``steps_per_epoch``
            (``trainer.limit_train_batches``), ``show_progress_bar``. Anything else is a TypeError.

    The learning rate is lit_embed's adapter default (3e-3, no weight decay) unless ``optimizer_params`` sets one;
    LlamaIndex's is 2e-5.
    """

    def __init__(
        self,
        dataset: Any,
        embed_model: Any,
        batch_size: int = 10,
        epochs: int = 1,
        adapter_model: Any | None = None,
        dim: int | None = None,
        device: str | None = None,
        model_output_path: str = "model_output",
        model_checkpoint_path: str | None = None,
        checkpoint_save_steps: int = 100,
        verbose: bool = False,
        bias: bool = False,
        *,
        val_dataset: Any | None = None,
        run_dir: str | os.PathLike | None = None,
        overrides: Sequence[str] = (),
        **train_kwargs: Any,
    ) -> None:
        unknown = [key for key in train_kwargs if key not in ADAPTER_TRAIN_KWARGS]
        if unknown:
            raise TypeError(f"EmbeddingAdapterFinetuneEngine() got an unexpected keyword argument {unknown[0]!r}")
        self.dataset = dataset
        self.embed_model = embed_model
        self.model_output_path = model_output_path
        self.run_dir = _run_dir(model_output_path, run_dir)
        head, self.adapter_cls_name = _adapter_overrides(adapter_model, bias)
        data, paths = _data_files(self.run_dir, {"train.json": dataset, "val.json": val_dataset})
        self._datasets = {**data, **{name: path for name, path in paths.items() if name not in data and path}}
        # Any other LlamaIndex embedding (a hosted API): its vectors of every text, computed once, are the base.
        self._black_box = _is_black_box(embed_model)
        model = "model=precomputed" if self._black_box else "model=minilm"
        args = [model, "data=qa_json", "method=adapter", *_device_overrides(device), *head]
        args += _values(
            {
                **(self._vector_files() if self._black_box else _embed_model_values(embed_model)),
                "data.train_path": paths["train.json"],
                "data.val_path": paths["val.json"],
                "data.batch_size": batch_size,
                "trainer.max_epochs": epochs,
                "++trainer.enable_progress_bar": train_kwargs.get("show_progress_bar", verbose),
                "output_dir": str(self.run_dir),
                "overwrite": True,
                **_without_validation(val_dataset),
            }
        )
        if model_checkpoint_path is not None:
            args += _values({"checkpoint.save_steps": checkpoint_save_steps})
        args += _train_kwargs_overrides(train_kwargs)
        self.overrides = [*args, *overrides]
        self._run = _Run(self.run_dir, self.overrides, data)
        self.metrics: dict[str, Any] = {}

    def finetune(self, **train_kwargs: Any) -> None:
        """Runs lit_embed, then puts the LlamaIndex-format adapter at ``model_output_path``."""
        if self._black_box:
            self._run.claim()
            _write_vectors(self.embed_model, self._datasets, self._vector_files())
        self.metrics = self._run()
        _copy_directory(self.run_dir / "llamaindex_adapter", Path(self.model_output_path))

    def _vector_files(self) -> dict[str, str]:
        return {
            "model.query_embeddings": str(self.run_dir / "query_embeddings.npy"),
            "model.document_embeddings": str(self.run_dir / "document_embeddings.npy"),
        }

    def get_finetuned_model(self, **model_kwargs: Any) -> Any:
        """LlamaIndex's ``AdapterEmbeddingModel`` of ``embed_model`` and the trained head, with the right
        ``adapter_cls`` (``LinearLayer`` or ``TwoLayerNN``; ``model_kwargs`` go to it). Without
        ``llama-index-embeddings-adapter`` installed: the path of the adapter's folder."""
        try:
            from llama_index.embeddings.adapter import AdapterEmbeddingModel
            from llama_index.embeddings.adapter.utils import LinearLayer, TwoLayerNN
        except ImportError:
            return str(self.model_output_path)
        embed_model = self.embed_model
        if isinstance(embed_model, (str, os.PathLike)):
            from llama_index.embeddings.huggingface import HuggingFaceEmbedding

            embed_model = HuggingFaceEmbedding(model_name=str(embed_model))
        adapter_cls = TwoLayerNN if self.adapter_cls_name == "TwoLayerNN" else LinearLayer
        return AdapterEmbeddingModel(
            embed_model, str(self.model_output_path), **({"adapter_cls": adapter_cls} | model_kwargs)
        )


@dataclass
class CrossEncoderFinetuningDatasetSample:
    """LlamaIndex's ``CrossEncoderFinetuningDatasetSample``: a question, a context, and whether the context answers
    it (``score`` 1) or not (0), as ``generate_ce_fine_tuning_dataset`` writes them."""

    query: str
    context: str
    score: int


class CrossEncoderFinetuneEngine:
    """LlamaIndex's ``CrossEncoderFinetuneEngine``: a reranker finetuned on (query, context, score) samples.

    The samples become lit_embed's rows (each query with the contexts scored 1 as positives and those scored 0 as
    its negatives; a query without a positive has nothing to rank and is left out), trained with ``task=rerank``:
    a query's own negatives first, mined ones where it has none, the pipeline evaluated on ``val_dataset``.

    Args:
        dataset: the training samples (LlamaIndex's ``CrossEncoderFinetuningDatasetSample`` or this module's, or
            any objects with ``query``, ``context`` and ``score``).
        model_id: the model to finetune, a cross-encoder (its score head kept) or any encoder (a fresh head).
        model_output_path: where the finetuned ``CrossEncoder`` is written; the run folder is
            ``<model_output_path>-run``.
        batch_size: ``data.batch_size`` (queries per batch, each with its candidates).
        val_dataset: validation samples, as ``dataset``: the reranked pipeline is scored on them before, during and
            after training and the best step is kept.
        loss: None (lit_embed's reranker default) or the name of a reranker loss config (``"rerank_bce"``,
            ``"rerank_ce"``, ``"rerank_mnrl"``, ``"rerank_lambda"``).
        epochs: ``trainer.max_epochs``.
        show_progress_bar: ``trainer.enable_progress_bar``.
        evaluation_steps: ``eval.evaluation_steps``.
        retriever: the first stage that fetches the candidates the evaluation reranks and mines negatives for
            queries without any (``rerank.retriever``; not a LlamaIndex argument). None: the model itself where it
            is an encoder, else all-MiniLM-L6-v2.
        device, run_dir, overrides: as for :class:`SentenceTransformersFinetuneEngine`.
    """

    def __init__(
        self,
        dataset: Sequence[Any],
        model_id: str = "cross-encoder/ms-marco-MiniLM-L-12-v2",
        model_output_path: str = "exp_finetune",
        batch_size: int = 10,
        val_dataset: Sequence[Any] | None = None,
        loss: str | None = None,
        epochs: int = 2,
        show_progress_bar: bool = True,
        evaluation_steps: int = 50,
        *,
        retriever: str | os.PathLike | None = None,
        device: Any | None = None,
        run_dir: str | os.PathLike | None = None,
        overrides: Sequence[str] = (),
    ) -> None:
        if loss is not None and not (isinstance(loss, str) and loss.startswith("rerank_")):
            raise TypeError(
                f"loss={loss!r}: give None or the name of a lit_embed reranker loss config (rerank_bce, rerank_ce, "
                "rerank_mnrl, rerank_lambda)"
            )
        self.model_output_path = model_output_path
        self.run_dir = _run_dir(model_output_path, run_dir)
        train_rows = _cross_encoder_rows(dataset, "dataset")
        args = ["task=rerank", "model=minilm", "data=qa_json", *_device_overrides(device)]
        args += [f"loss={loss}"] if loss is not None else []
        args += _values(
            {
                "model.model_name_or_path": str(model_id),
                "model.max_seq_length": None,  # the model's own, as CrossEncoder(model_id) has it
                "rerank.retriever": str(retriever) if retriever is not None else None,
                "data.train_path": str(self.run_dir / "train.jsonl"),
                "data.val_path": str(self.run_dir / "val.json") if val_dataset is not None else None,
                "data.batch_size": batch_size,
                "trainer.max_epochs": epochs,
                "++trainer.enable_progress_bar": show_progress_bar,
                "eval.evaluation_steps": evaluation_steps,
                "output_dir": str(self.run_dir),
                "overwrite": True,
                **_without_validation(val_dataset),
            }
        )
        self.overrides = [*args, *overrides]
        data = {"val.json": _cross_encoder_validation(val_dataset)} if val_dataset is not None else {}
        self._run = _Run(self.run_dir, self.overrides, data, {"train.jsonl": train_rows})
        self.metrics: dict[str, Any] = {}

    def finetune(self, **train_kwargs: Any) -> None:
        """Runs lit_embed, then puts the finetuned ``CrossEncoder`` at ``model_output_path``; ``metrics`` holds
        ``metrics.json``'s content."""
        self.metrics = self._run()
        _copy_directory(self.run_dir / "model", Path(self.model_output_path))

    def push_to_hub(self, repo_id: str = "", **kwargs: Any) -> None:
        """Uploads the finetuned model, as LlamaIndex's engine does (``CrossEncoder.push_to_hub``)."""
        from sentence_transformers import CrossEncoder

        CrossEncoder(str(self.model_output_path)).push_to_hub(repo_id, **kwargs)

    def get_finetuned_model(self, model_name: str | None = None, top_n: int = 3) -> Any:
        """LlamaIndex's ``SentenceTransformerRerank`` node postprocessor over the finetuned model (or ``model_name``),
        keeping the ``top_n`` best nodes. Without llama-index-core installed: the model's path."""
        path = str(model_name or self.model_output_path)
        try:
            from llama_index.core.postprocessor import SentenceTransformerRerank
        except ImportError:
            return path
        return SentenceTransformerRerank(model=path, top_n=top_n)


def _cross_encoder_rows(samples: Sequence[Any], what: str) -> list[dict[str, Any]]:
    """LlamaIndex's (query, context, score) samples as lit_embed's rows: each query with its relevant contexts
    (score >= 0.5) as positives and the others as its negatives; queries without a relevant context left out."""
    positives: dict[str, list[str]] = {}
    negatives: dict[str, list[str]] = {}
    for number, sample in enumerate(samples):
        if not all(hasattr(sample, name) for name in ("query", "context", "score")):
            raise TypeError(
                f"{what}[{number}] is a {type(sample).__name__}, not a CrossEncoderFinetuningDatasetSample (an object "
                "with query, context and score)"
            )
        kind = positives if float(sample.score) >= 0.5 else negatives
        kind.setdefault(sample.query, []).append(sample.context)
        positives.setdefault(sample.query, [])
    rows = [
        {"query": query, "positive": positive, "negatives": [n for n in negatives.get(query, []) if n not in relevant]}
        for query, relevant in positives.items()
        for positive in relevant
    ]
    if not rows:
        raise ValueError(f"{what}: no sample has score 1, so there is no relevant context to train the reranker on")
    return rows


def _cross_encoder_validation(samples: Sequence[Any]) -> Any:
    """Validation samples as a retrieval set: every context a document, the relevant ones of each query."""
    from lit_embed.data.schema import QADataset

    rows = _cross_encoder_rows(samples, "val_dataset")
    corpus: dict[str, str] = {}
    for row in rows:
        for text in [row["positive"], *row["negatives"]]:
            corpus.setdefault(text, f"c{len(corpus)}")
    queries = {f"q{i}": query for i, query in enumerate(dict.fromkeys(row["query"] for row in rows))}
    ids = {query: qid for qid, query in queries.items()}
    relevant: dict[str, list[str]] = {}
    for row in rows:
        relevant.setdefault(ids[row["query"]], []).append(corpus[row["positive"]])
    return QADataset(queries, {cid: text for text, cid in corpus.items()}, relevant)


def _run_dir(model_output_path: str | os.PathLike, run_dir: str | os.PathLike | None) -> Path:
    output = Path(model_output_path)
    path = Path(run_dir) if run_dir is not None else output.parent / f"{output.name}-run"
    if path.resolve() == output.resolve() or output.resolve().is_relative_to(path.resolve()):
        raise ValueError(
            f"run_dir={str(path)!r} would hold model_output_path={str(output)!r}, which is replaced at the end of "
            "the run: choose a run_dir beside it."
        )
    return path


def _data_files(run_dir: Path, datasets: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str | None]]:
    """The datasets to write into ``run_dir`` (by file name), and the path each ``data.*_path`` reads."""
    to_write, paths = {}, {}
    for name, dataset in datasets.items():
        if dataset is None or isinstance(dataset, (str, os.PathLike)):
            paths[name] = None if dataset is None else str(dataset)
        else:
            to_write[name] = _qa_dataset(dataset)
            paths[name] = str(run_dir / name)
    return to_write, paths


def _qa_dataset(dataset: Any) -> Any:
    """lit_embed's ``QADataset`` of any object with LlamaIndex's ``queries``, ``corpus`` and ``relevant_docs``."""
    from lit_embed.data.schema import QADataset

    if isinstance(dataset, QADataset):
        return dataset
    if not all(hasattr(dataset, name) for name in ("queries", "corpus", "relevant_docs")):
        raise TypeError(
            f"dataset must be an EmbeddingQAFinetuneDataset, a QADataset or a file path, not {type(dataset).__name__}"
        )
    return QADataset(
        dict(dataset.queries), dict(dataset.corpus), {q: list(docs) for q, docs in dataset.relevant_docs.items()}
    )


def _without_validation(val_dataset: Any) -> dict[str, Any]:
    """Without validation data nothing picks a best step: the last one is kept and every pair trains, as LlamaIndex's
    engines do (no held-out slice)."""
    return {"checkpoint.monitor": None, "data.val_fraction": 0} if val_dataset is None else {}


def _values(values: dict[str, Any]) -> list[str]:
    """``key=value`` overrides; texts quoted so that any path or prompt reaches the config unchanged."""
    return [f"{key}={_hydra_value(value)}" for key, value in values.items()]


def _hydra_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    # In a quoted override only backslashes before a quote (or at the end) are escapes.
    text = re.sub(r"(\\+)(?='|$)", lambda m: m[1] * 2, str(value))
    return "'" + text.replace("'", "\\'") + "'"


def _device_overrides(device: Any) -> list[str]:
    if device is None:
        return []
    kind, _, index = str(device).partition(":")
    if kind == "cpu":
        return ["trainer=cpu"]
    if kind == "cuda":
        return ["trainer.accelerator=gpu", f"trainer.devices=[{index}]" if index else "trainer.devices=1"]
    if kind == "mps":
        return ["trainer.accelerator=mps", "trainer.devices=1"]
    raise ValueError(f"device={device!r}: use 'cpu', 'cuda', 'cuda:N', 'mps', or None for the GPU when there is one.")


def _loss_overrides(loss: Any) -> list[str]:
    if loss is None:
        return []
    if isinstance(loss, str):
        return [f"loss={loss}"]
    name = type(loss).__name__
    similarity = getattr(getattr(loss, "similarity_fct", None), "__name__", "cos_sim")
    if name in ("MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss") and similarity == "cos_sim":
        if name == "MultipleNegativesRankingLoss":
            return ["loss=mnrl", f"loss.scale={float(loss.scale)!r}"]
        return [
            "loss=cached_mnrl",
            f"loss.loss.scale={float(loss.scale)!r}",
            f"loss.mini_batch_size={loss.mini_batch_size}",
        ]
    raise ValueError(
        f"loss={name}(similarity_fct={similarity}) has no lit_embed counterpart here: pass None (MNRL), a "
        "sentence-transformers MultipleNegativesRankingLoss or CachedMultipleNegativesRankingLoss with cosine "
        "similarity, or the name of a lit_embed loss config such as 'gist' or 'matryoshka'."
    )


def _is_black_box(embed_model: Any) -> bool:
    """Whether ``embed_model`` is a LlamaIndex embedding lit_embed cannot load itself (not a HuggingFaceEmbedding)."""
    if isinstance(embed_model, (str, os.PathLike)) or type(embed_model).__name__ == "HuggingFaceEmbedding":
        return False
    if not all(hasattr(embed_model, name) for name in ("get_query_embedding", "get_text_embedding_batch")):
        raise TypeError(
            f"embed_model must be a LlamaIndex embedding (such as HuggingFaceEmbedding) or a model name or path, "
            f"not {type(embed_model).__name__}"
        )
    return True


def _write_vectors(embed_model: Any, datasets: dict[str, Any], files: dict[str, str]) -> None:
    """``embed_model``'s vector of every query and document of the datasets, as ``model=precomputed`` reads them:
    queries with ``get_query_embedding``, documents with ``get_text_embedding_batch``, as LlamaIndex's engine
    embeds them (once here, not in every epoch)."""
    import numpy as np

    from lit_embed.data.formats import load_dataset

    texts: dict[str, dict[str, str]] = {"query": {}, "document": {}}
    for name, dataset in datasets.items():
        data = load_dataset(dataset) if isinstance(dataset, str) else dataset
        for kind, records in (("query", data.queries), ("document", data.corpus)):
            for key, text in records.items():
                if texts[kind].setdefault(key, text) != text:
                    raise ValueError(
                        f"{kind} id {key!r} of {name} names another text in the other dataset: the vectors are "
                        "stored by id, so give the training and validation data distinct ids."
                    )
    queries, documents = texts["query"], texts["document"]
    vectors = {
        "model.query_embeddings": (list(queries), [embed_model.get_query_embedding(q) for q in queries.values()]),
        "model.document_embeddings": (list(documents), embed_model.get_text_embedding_batch(list(documents.values()))),
    }
    for key, (ids, rows) in vectors.items():
        path = Path(files[key])
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.asarray(rows, dtype=np.float32))
        path.with_suffix(".json").write_text(json.dumps(ids), encoding="utf-8")


def _embed_model_values(embed_model: Any) -> dict[str, Any]:
    """The ``model.*`` settings that make lit_embed's encoder embed as ``embed_model`` does."""
    if isinstance(embed_model, (str, os.PathLike)):
        return {"model.model_name_or_path": str(embed_model), "model.max_seq_length": None}
    # HuggingFaceEmbedding encodes with these prompts (its instructions, or its defaults for known models).
    prompts = llamaindex_prompts(embed_model)
    return {
        "model.model_name_or_path": embed_model.model_name,
        "model.max_seq_length": embed_model.max_length,
        "model.query_prompt": prompts.get("query", embed_model.query_instruction or ""),
        "model.document_prompt": prompts.get("text", embed_model.text_instruction or ""),
    }


def _adapter_overrides(adapter_model: Any, bias: bool) -> tuple[list[str], str]:
    """The ``adapter`` settings for LlamaIndex's adapter object, and the LlamaIndex class that loads the result."""
    if adapter_model is None:
        return ["adapter=linear", *_values({"adapter.bias": bias})], "LinearLayer"
    import torch

    name = type(adapter_model).__name__
    if name == "LinearLayer":
        weight = adapter_model.linear.weight
        started = torch.equal(weight, torch.eye(*weight.shape)) and (
            adapter_model.linear.bias is None or not adapter_model.linear.bias.any()
        )
        _check_adapter(adapter_model, started)
        return ["adapter=linear", *_values({"adapter.bias": bool(adapter_model.bias)})], name
    if name == "TwoLayerNN":
        residual = llamaindex_adds_residual(adapter_model)
        _check_adapter(adapter_model, not residual or not adapter_model.residual_weight.any())
        values = {
            "adapter.hidden_dim": adapter_model.hidden_features,
            "adapter.activation": adapter_model.activation_fn_str,
            "adapter.residual": residual,
        }
        return ["adapter=mlp", *_values(values)], name
    raise ValueError(
        f"adapter_model={name}: lit_embed trains LlamaIndex's LinearLayer and TwoLayerNN (adapter=linear, "
        "adapter=mlp); pass one of those, or None for a linear head."
    )


def _check_adapter(adapter: Any, untrained: bool) -> None:
    if adapter.in_features != adapter.out_features:
        raise ValueError(
            f"adapter_model={type(adapter).__name__}({adapter.in_features} -> {adapter.out_features}): LlamaIndex's "
            "AdapterEmbeddingModel maps queries only, so the head must keep the embedding size; use "
            "out_features=in_features (lit_embed's adapter.out_dim maps documents too, outside LlamaIndex)."
        )
    if not untrained:
        raise ValueError(
            f"adapter_model={type(adapter).__name__} has trained weights: lit_embed starts a head afresh and cannot "
            "continue from these. Pass a new one (or None), or train on from lit_embed's checkpoint with resume=true."
        )


def _train_kwargs_overrides(train_kwargs: dict[str, Any]) -> list[str]:
    values: dict[str, Any] = {}
    if "steps_per_epoch" in train_kwargs and train_kwargs["steps_per_epoch"] is not None:
        values["++trainer.limit_train_batches"] = int(train_kwargs["steps_per_epoch"])
    if "max_grad_norm" in train_kwargs:
        values["trainer.gradient_clip_val"] = train_kwargs["max_grad_norm"]
    for key, value in (train_kwargs.get("optimizer_params") or {}).items():
        values[f"++optimizer.{key}"] = value
    args = _values(values)
    optimizer = train_kwargs.get("optimizer_class")
    if optimizer is not None and optimizer.__name__ != "AdamW":
        # ``fused`` is an AdamW setting of lit_embed's config that other optimizers may not take.
        args = [f"optimizer._target_={optimizer.__module__}.{optimizer.__qualname__}", "~optimizer.fused", *args]
    return args


def _copy_directory(source: Path, destination: Path) -> None:
    """Replaces ``destination`` with a copy of ``source``, swapped in whole."""
    from lit_embed.files import write_directory_atomic

    if not source.is_dir():
        raise FileNotFoundError(f"the run wrote no {source}; see its messages above.")
    write_directory_atomic(destination, lambda staging: shutil.copytree(source, staging, dirs_exist_ok=True))
