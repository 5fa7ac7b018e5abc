"""The model card: ``model/README.md`` as a model hub page reads it, written from what the run recorded.

* :func:`model_card`: the card's text from a plain facts dict (every key optional but the method; what is not
  known is left out, never written as a placeholder).
* :func:`run_facts`: the facts of a finished run (the trainer, the module, the metrics, the saved model).
* :func:`checkpoint_facts`: the facts a checkpoint holds, for ``lit-embed-export``.
* :func:`write_model_card`: replaces sentence-transformers' generic ``README.md`` in a saved model with the card.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from lit_embed.data.datamodule import PairDataModule, trainer_data
from lit_embed.evaluation import METRIC_NAMES
from lit_embed.evaluation.retrieval import format_metrics_table
from lit_embed.files import write_text_atomic
from lit_embed.models import adapters
from lit_embed.models.lora import lora_config

METHOD_TAGS = {"full": "full-finetuning", "adapter": "adapter", "lora": "lora"}
METHOD_TEXT = {
    "full": "full finetuning: every weight of the encoder trained",
    "adapter": "an adapter: a small head trained on the frozen encoder's embeddings",
    "lora": "LoRA: low-rank updates of the frozen encoder's linear layers, merged into this model",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LOAD_LINE = re.compile(r"""SentenceTransformer\(\s*["']([^"']+)["']""")


def model_card(facts: Mapping[str, Any]) -> str:
    """The card's text: YAML front matter (hub metadata, ``model-index``), then what was trained and how to load it."""
    return "---\n" + yaml.safe_dump(front_matter(facts), sort_keys=False, allow_unicode=True) + "---\n\n" + _body(facts)


def front_matter(facts: Mapping[str, Any]) -> dict[str, Any]:
    """The hub's metadata: library, pipeline, base model, tags, datasets (when known), ``model-index``."""
    meta: dict[str, Any] = {}
    reranker = facts.get("reranker", False)
    if facts.get("text_model", True):  # a head alone (over precomputed vectors) is no sentence-transformers model
        pipeline = "text-ranking" if reranker else "sentence-similarity"
        meta = {"library_name": "sentence-transformers", "pipeline_tag": pipeline}
    if facts.get("base_model"):
        meta["base_model"] = facts["base_model"]
    tags = ["sentence-transformers", "feature-extraction", "sentence-similarity", "lit_embed"]
    if reranker:
        tags = ["sentence-transformers", "cross-encoder", "reranker", "text-ranking", "lit_embed"]
    tags += [METHOD_TAGS.get(facts["method"], facts["method"])]
    tags += [f"loss:{loss}" for loss in facts.get("losses", ())]
    meta["tags"] = list(dict.fromkeys(tags))
    if facts.get("datasets"):
        meta["datasets"] = list(facts["datasets"])
    final = (facts.get("metrics") or {}).get("final")
    kind = "reranked" if reranker else "cosine"
    if final and facts.get("validation_data"):  # the hub's schema names the data the metrics were measured on
        meta["model-index"] = [
            {
                "name": _title(facts),
                "results": [
                    {
                        "task": {"type": "reranking", "name": "Reranking"}
                        if reranker
                        else {"type": "information-retrieval", "name": "Information Retrieval"},
                        "dataset": {"name": facts["validation_data"], "type": facts["validation_data"]},
                        "metrics": [
                            {"type": name, "value": float(final[name]), "name": f"{kind} {name}"}
                            for name in METRIC_NAMES
                            if name in final
                        ],
                    }
                ],
            }
        ]
    return meta


def _title(facts: Mapping[str, Any]) -> str:
    if facts.get("reranker"):
        return f"{facts.get('base_model') or 'A cross-encoder'} reranker finetuned with lit_embed ({facts['method']})"
    base = facts.get("base_model") or "An embedding model"
    return f"{base} finetuned with lit_embed ({facts['method']})"


def _body(facts: Mapping[str, Any]) -> str:
    base = facts.get("base_model")
    origin = ""
    if base:
        origin = f" from [{base}](https://huggingface.co/{base})" if _HUB_ID.match(base) else f" from `{base}`"
    parts = [f"# {_title(facts)}\n"]
    text_model = facts.get("text_model", True)
    shape = ""
    if facts.get("embedding_dim"):
        shape = f" It maps queries and documents to {facts['embedding_dim']}-dimensional vectors"
        shape += f", compared by {facts['similarity']} similarity." if facts.get("similarity") else "."
    kind = "A [sentence-transformers](https://www.sbert.net) model" if text_model else "An adapter head"
    if facts.get("reranker"):
        kind, shape = (
            "A [sentence-transformers](https://www.sbert.net) `CrossEncoder`",
            (
                " It reads a query and a document together and gives one relevance score: the second stage of "
                "retrieval, reordering a first stage's top candidates."
            ),
        )
    parts.append(f"{kind} finetuned{origin} for retrieval with lit_embed.{shape}\n")
    if facts.get("exported_from"):
        source = facts["exported_from"]
        parts.append(f"Exported from checkpoint `{source['checkpoint']}` at step {source['step']}.\n")
    parts.append("## Training\n\n" + "\n".join(f"- {line}" for line in _training_lines(facts)) + "\n")
    metrics = facts.get("metrics") or {}
    if metrics.get("base") and metrics.get("final"):
        step = metrics["final"].get("step", facts.get("step"))
        alpha = metrics["final"].get("alpha")
        if alpha is None or not metrics.get("finetuned"):
            columns, shown = {"base": metrics["base"], "final": metrics["final"]}, f"this model (step {step})"
        else:
            columns = {"base": metrics["base"], "finetuned": metrics["finetuned"], "final": metrics["final"]}
            shown = (
                f"the finetuned weights of step {step}, and this model: those weights merged with the base "
                f"model's, {alpha:g} · finetuned + {1 - alpha:.2g} · base, the best of the merges tried"
            )
        how = "cosine similarity, exact search"
        if facts.get("reranker"):
            top_k = (facts.get("fusion") or {}).get("top_k")
            how = f"each query's top {top_k} from the first stage, reordered" if top_k else "the first stage reordered"
        parts.append(
            f"## Results\n\nRetrieval on {_validation(facts)}: the base model, then {shown}; {how}."
            f"\n\n```\n{format_metrics_table(columns)}\n```\n"
        )
    elif metrics.get("final"):
        final = metrics["final"]
        rows = "\n".join(f"| {name} | {final[name]:.4f} |" for name in METRIC_NAMES if name in final)
        table = f"| metric | value |\n| --- | --- |\n{rows}"
        parts.append(f"## Results\n\nRetrieval on {_validation(facts)}:\n\n{table}\n")
    if facts.get("fusion"):
        parts.append("## The pipeline's fusion weight\n\n" + _fusion(facts["fusion"]) + "\n")
    if "prompts" in facts:
        parts.append("## Prompts\n\n" + _prompts(facts["prompts"]) + "\n")
    parts.append("## Usage\n\n" + (_reranker_usage(facts) if facts.get("reranker") else _usage(facts)))
    return "\n".join(parts)


def _validation(facts: Mapping[str, Any]) -> str:
    return f"`{facts['validation_data']}`" if facts.get("validation_data") else "the validation set"


def _training_lines(facts: Mapping[str, Any]) -> list[str]:
    hp = facts.get("hyperparameters") or {}
    lines = [f"Method: {METHOD_TEXT.get(facts['method'], facts['method'])}"]
    if facts.get("lora"):
        lora = facts["lora"]
        targets = lora["target_modules"]
        targets = ", ".join(targets) if isinstance(targets, list | tuple) else targets
        lines.append(f"LoRA: rank {lora['r']}, alpha {lora['alpha']}, dropout {lora['dropout']}, on {targets}")
    if facts.get("adapter"):
        head = facts["adapter"]
        maps = "queries only" if head.get("transform") == "query" else "queries and documents"
        lines.append(f"Adapter: {head['class']}, mapping {maps}")
    if facts.get("losses"):
        lines.append(f"Loss: {', '.join(facts['losses'])}")
    data = ", ".join(f"`{name}`" for name in facts.get("train_data", ()))
    if facts.get("training_pairs") is not None:
        lines.append(f"Training pairs: {facts['training_pairs']}" + (f" from {data}" if data else ""))
    elif data:
        lines.append(f"Training data: {data}")
    if facts.get("validation_data"):
        lines.append(f"Validation data: `{facts['validation_data']}`")
    if "epochs" in hp:
        lines.append(f"Epochs: {hp['epochs']}" + (f" (at most {hp['max_steps']} steps)" if hp.get("max_steps") else ""))
    elif hp.get("max_steps"):
        lines.append(f"Steps: at most {hp['max_steps']}")
    if facts.get("steps") is not None:
        steps = f"Optimizer steps: {facts['steps']}"
        if facts.get("step") is not None and facts["step"] != facts["steps"]:
            steps += f"; this model is step {facts['step']}'s, the best by the validation metric"
        lines.append(steps)
    if "batch_size" in hp:
        lines.append(f"Batch size: {hp['batch_size']} pairs per device")
    if "learning_rate" in hp:
        lr = f"Learning rate: {hp['learning_rate']:g}"
        if hp.get("optimizer"):
            lr += f" ({hp['optimizer']}" + (f", weight decay {hp['weight_decay']:g})" if "weight_decay" in hp else ")")
        lines.append(lr)
    if "warmup_steps" in hp:
        lines.append(f"Warmup: {hp['warmup_steps']} of {hp['total_steps']} steps, then linear decay to 0")
    elif "warmup_ratio" in hp:
        lines.append(f"Warmup: {hp['warmup_ratio']:g} of the steps, then linear decay to 0")
    if "max_seq_length" in hp:
        lines.append(f"Max sequence length: {hp['max_seq_length']} tokens")
    if "precision" in hp:
        lines.append(f"Precision: {hp['precision']}")
    if facts.get("hardware"):
        lines.append(f"Hardware: {facts['hardware']}")
    if facts.get("wall_time_s") is not None:
        resumed = f" (since it resumed from `{facts['resumed_from']}`)" if facts.get("resumed_from") else ""
        lines.append(f"Wall time: {duration(facts['wall_time_s'])}{resumed}")
    if facts.get("versions"):
        written = "Exported with" if facts.get("exported_from") else "Versions"
        lines.append(f"{written}: " + ", ".join(f"{name} {v}" for name, v in facts["versions"].items()))
    return lines


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 41 s``, ``2 h 05 min``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _prompts(prompts: Mapping[str, str]) -> str:
    used = {kind: text for kind, text in prompts.items() if text}
    if not used:
        return "None: queries and documents are embedded as they are."
    lines = [f"- {kind}: `{json.dumps(text)}`" for kind, text in used.items()]
    return "\n".join(lines) + "\n\n`encode_query` and `encode_document` put them before each text."


def _fusion(fusion: Mapping[str, Any]) -> str:
    """Which weight of the reranker's score against the retriever's the run chose, and why."""
    weight, metric = fusion["weight"], fusion["metric"]
    by_weight = fusion["by_weight"]
    retriever, reranker = by_weight["0.0"][metric], by_weight["1.0"][metric]
    chosen = by_weight[str(weight)][metric]
    why = {
        0.0: "no blend beat the retriever's order there with 95% confidence query by query, so the pipeline keeps "
        "that order",
        1.0: "the reranker's order alone scored best there",
    }.get(weight, "the blend scored better there than the retriever's order, with 95% confidence query by query")
    return (
        f"Each candidate is scored `{weight:g} * z(reranker logit) + {1 - weight:.2g} * z(retriever cosine)` (`z`: a "
        "stage's scores standardized over the query's candidates), the "
        f"weight chosen on the validation set by {metric} over the retriever's top {fusion['top_k']} "
        f"(`{fusion['retriever']}`): {metric} {chosen:.4f}, against {retriever:.4f} for the retriever's order and "
        f"{reranker:.4f} for the reranker's alone; {why}. `model/fusion.json` records it, and "
        "`lit-embed-eval RETRIEVER DATA --rerank MODEL` applies it."
    )


def _reranker_usage(facts: Mapping[str, Any]) -> str:
    path = json.dumps(facts.get("model_path", "."))
    return (
        "sentence-transformers (lit_embed not needed):\n\n```python\nfrom sentence_transformers import CrossEncoder\n\n"
        f"model = CrossEncoder({path})\n"
        'scores = model.predict([("How do I reset my password?", "To reset your password, open Settings ...")])\n'
        'ranked = model.rank("How do I reset my password?", ["To reset ...", "Billing ..."])\n```\n\n'
        "LlamaIndex, reordering a retriever's nodes:\n\n```python\n"
        "from llama_index.core.postprocessor import SentenceTransformerRerank\n\n"
        f"reranker = SentenceTransformerRerank(model={path}, top_n=5)\n```\n"
    )


def _usage(facts: Mapping[str, Any]) -> str:
    path = json.dumps(facts.get("model_path", "."))
    if not facts.get("text_model", True):
        return (
            f"`{facts.get('model_path')}/adapter.safetensors` holds the head alone (its settings in "
            "`adapter_config.json`): apply it to the query vectors of the model the training vectors came from.\n"
        )
    sections = [
        "sentence-transformers (lit_embed not needed):\n\n```python\nfrom sentence_transformers import "
        f"SentenceTransformer\n\nmodel = SentenceTransformer({path})\n"
        'queries = model.encode_query(["How do I reset my password?"])\n'
        'docs = model.encode_document(["To reset your password, open Settings ..."])\n'
        "print(model.similarity(queries, docs))\n```\n"
    ]
    adapter = facts.get("adapter")
    if adapter and adapter.get("transform") == "query":
        sections.append(
            "The adapter maps queries only: `encode_query` gives the adapted query vectors, `encode_document` the "
            "base model's document vectors (the ones already in your vector store stay valid). Plain `encode()` and "
            "LlamaIndex's `HuggingFaceEmbedding` alone give the base model's vectors for queries too.\n"
        )
    if adapter and facts.get("llamaindex_adapter"):
        cls = getattr(adapters, adapter["class"]).llamaindex_class
        sections.append(
            "LlamaIndex, with the adapter on the query vectors:\n\n```python\n"
            "from llama_index.embeddings.adapter import AdapterEmbeddingModel\n"
            f"from llama_index.embeddings.adapter.utils import {cls}\n"
            "from llama_index.embeddings.huggingface import HuggingFaceEmbedding\n\n"
            f"embed_model = AdapterEmbeddingModel(\n    HuggingFaceEmbedding(model_name={path}),\n"
            f"    {json.dumps(facts['llamaindex_adapter'])},\n    adapter_cls={cls},\n)\n```\n"
        )
    else:
        sections.append(
            "LlamaIndex:\n\n```python\nfrom llama_index.embeddings.huggingface import HuggingFaceEmbedding\n\n"
            f"embed_model = HuggingFaceEmbedding(model_name={path})\n```\n"
        )
    if facts.get("lora_dir"):
        sections.append(
            f"The LoRA adapter alone (PEFT's format) is in `{facts['lora_dir']}`; its `adapter_config.json` names the "
            "base model:\n\n```python\nimport json\nfrom sentence_transformers import SentenceTransformer\n\n"
            f"base = json.load(open({json.dumps(facts['lora_dir'] + '/adapter_config.json')}))"
            '["base_model_name_or_path"]\n'
            f"model = SentenceTransformer(base)\nmodel.load_adapter({json.dumps(facts['lora_dir'])})\n```\n"
        )
    return "\n".join(sections)


def write_model_card(model_dir: str | os.PathLike, facts: Mapping[str, Any]) -> Path:
    """Writes the card to ``model_dir/README.md`` (atomically), replacing sentence-transformers' generic one."""
    path = Path(model_dir) / "README.md"
    write_text_atomic(path, model_card(facts))
    return path


def base_model_name(model_name_or_path: str | os.PathLike) -> str:
    """What the card names as the base model: the hub id when one is known, else the local folder's name.

    A path that does not exist was loaded from the hub by that id. A local folder's id comes from the hub cache's
    folder name (``models--ORG--NAME``), the sentence-transformers card it ships (``SentenceTransformer("ORG/NAME")``,
    as the hub's cards load it; not one of lit_embed's cards, whose load line is a local path), or its
    ``config.json``'s ``_name_or_path`` when that ends in the folder's own name (a local copy of a hub model; a
    finetuned model's ``_name_or_path`` is its parent's id, not its own).
    """
    path = Path(model_name_or_path)
    if not path.exists():
        return str(model_name_or_path)
    path = path.resolve()
    for part in reversed(path.parts):
        if part.startswith("models--") and part.count("--") >= 2:
            return "/".join(part.split("--", 2)[1:])
    readme = path / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        if "lit_embed" not in _front_matter_tags(text):
            match = _LOAD_LINE.search(text)
            if match and _HUB_ID.match(match.group(1)) and not Path(match.group(1)).exists():
                return match.group(1)
    config = path / "config.json"
    if config.is_file():
        try:
            named = json.loads(config.read_text(encoding="utf-8")).get("_name_or_path", "")
        except (ValueError, AttributeError):
            named = ""
        if isinstance(named, str) and _HUB_ID.match(named) and named.split("/")[-1].lower() == path.name.lower():
            return named
    return path.name


def _front_matter_tags(text: str) -> list[str]:
    if not text.startswith("---"):
        return []
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except (yaml.YAMLError, IndexError):
        return []
    tags = meta.get("tags") if isinstance(meta, dict) else None
    return [str(t) for t in tags] if isinstance(tags, list) else []


def versions() -> dict[str, str]:
    """The versions of what trained or wrote the model."""
    found = {}
    for name in ("lit_embed", "torch", "sentence-transformers", "transformers", "lightning"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def saved_model_facts(model_dir: str | os.PathLike) -> dict[str, Any]:
    """What the saved directory itself says: its prompts, embedding size and similarity (sentence-transformers'
    files); a directory without ``modules.json`` is a head alone (an adapter over precomputed vectors)."""
    model_dir = Path(model_dir)
    if not (model_dir / "modules.json").is_file():
        return {"text_model": False}
    facts: dict[str, Any] = {"text_model": True}
    config = model_dir / "config_sentence_transformers.json"
    if config.is_file():
        saved = json.loads(config.read_text(encoding="utf-8"))
        if isinstance(saved.get("prompts"), dict):
            facts["prompts"] = {k: v for k, v in saved["prompts"].items() if k in ("query", "document")}
        if saved.get("similarity_fn_name"):
            facts["similarity"] = saved["similarity_fn_name"]
    return facts


def _encoder_facts(encoder_config: Mapping[str, Any], lora: Mapping[str, Any] | None) -> dict[str, Any]:
    """Base model, method and head from an encoder's config (``Encoder.config`` / ``AdaptedEncoder.config``)."""
    facts: dict[str, Any] = {}
    if encoder_config.get("reranker"):
        facts["reranker"] = True
    if "adapter" in encoder_config:
        facts["method"] = "adapter"
        head = dict(encoder_config["adapter"])
        facts["adapter"] = {"class": head["class"], "transform": head.get("transform")}
        base = encoder_config.get("base") or {}
    else:
        facts["method"] = "lora" if lora else "full"
        base = encoder_config
    if lora:
        facts["lora"] = dict(lora)
    if base.get("model_name_or_path"):
        facts["base_model"] = base_model_name(base["model_name_or_path"])
    if base.get("max_seq_length"):
        facts["hyperparameters"] = {"max_seq_length": base["max_seq_length"]}
    return facts


def _display_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it is inside it, as a user would type it."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _hardware(trainer: L.Trainer) -> str:
    device = trainer.strategy.root_device
    count = trainer.num_devices * trainer.num_nodes
    if device.type == "cuda":
        return f"{count} x {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        name = _cpu_name()
        return f"{count} x CPU" + (f" ({name})" if name else "") + f", {torch.get_num_threads()} threads"
    return f"{count} x {device.type}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _losses(loss: torch.nn.Module) -> list[str]:
    if isinstance(loss, torch.nn.ModuleDict):  # multi-task: one loss per task
        return list(dict.fromkeys(type(task_loss).__name__ for task_loss in loss.values()))
    return [type(loss).__name__]


def _data_facts(datamodule: PairDataModule | None, metrics: Mapping[str, Any]) -> dict[str, Any]:
    if datamodule is None:
        return {}
    tasks = datamodule.task_modules()
    facts: dict[str, Any] = {}
    counts = [data.num_training_pairs for data in tasks]
    if None not in counts:
        facts["training_pairs"] = sum(counts)
    val_path, source = datamodule.val_path, datamodule.source
    names = [Path(data.train_path).name for data in tasks if data.train_path]
    if names:
        facts["train_data"] = names
    elif source:
        facts["train_data"] = [source]
    if metrics and (val_path or source):
        facts["validation_data"] = Path(val_path).name if val_path else f"{source} (validation split)"
    batch_sizes = {data.batch_size for data in tasks if data.batch_size is not None}
    if len(batch_sizes) == 1:
        facts["batch_size"] = batch_sizes.pop()
    return facts


def run_facts(
    trainer: L.Trainer,
    module: L.LightningModule,
    metrics: Mapping[str, Any],
    step: int,
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    started: float | None = None,
) -> dict[str, Any]:
    """The facts of a finished run, from what ran it: the trainer (steps, schedule, hardware), the module (method,
    loss, encoder), the data module (pairs, files), ``metrics.json``'s content and the saved model.

    ``started``: ``time.time()`` when the run started (None: no wall time).
    """
    encoder = module.encoder
    facts: dict[str, Any] = _encoder_facts(encoder.config, lora_config(encoder))
    facts["losses"] = _losses(module.loss)
    data = _data_facts(trainer_data(trainer), metrics)
    hp = facts.setdefault("hyperparameters", {})
    if "batch_size" in data:
        hp["batch_size"] = data.pop("batch_size")
    facts.update(data)
    if trainer.max_steps is None or trainer.max_steps < 0:
        hp["epochs"] = trainer.max_epochs
    else:
        hp["max_steps"] = trainer.max_steps
    if trainer.optimizers:
        optimizer = trainer.optimizers[0]
        hp["optimizer"] = type(optimizer).__name__
        hp["learning_rate"] = optimizer.defaults["lr"]
        if "weight_decay" in optimizer.defaults:
            hp["weight_decay"] = optimizer.defaults["weight_decay"]
    schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
    if schedulers and hasattr(schedulers[0], "warmup_steps"):
        hp["warmup_steps"], hp["total_steps"] = schedulers[0].warmup_steps, schedulers[0].total_steps
    if getattr(encoder, "max_seq_length", None):
        hp["max_seq_length"] = encoder.max_seq_length
    hp["precision"] = str(trainer.precision)
    facts["steps"] = trainer.global_step
    facts["step"] = step
    facts["hardware"] = _hardware(trainer)
    if started is not None:
        facts["wall_time_s"] = time.time() - started
    if trainer.ckpt_path:  # the wall time is then this run's, since the resume
        facts["resumed_from"] = Path(trainer.ckpt_path).name
    facts["versions"] = versions()
    if metrics.get("final"):
        facts["metrics"] = {key: dict(metrics[key]) for key in ("base", "final") if metrics.get(key)}
    if metrics.get("fusion"):
        facts["fusion"] = dict(metrics["fusion"])
    if getattr(encoder, "embedding_dim", None):
        facts["embedding_dim"] = encoder.embedding_dim
    facts.update(saved_model_facts(model_dir))
    if not facts["text_model"]:  # vectors computed elsewhere: no tokenizer, no sequence length of its own
        hp.pop("max_seq_length", None)
    facts["model_path"] = _display_path(model_dir)
    output_dir = Path(output_dir)
    if (output_dir / "llamaindex_adapter").is_dir() and facts["method"] == "adapter":
        facts["llamaindex_adapter"] = _display_path(output_dir / "llamaindex_adapter")
    if facts["method"] == "lora":
        facts["lora_dir"] = _display_path(output_dir / "lora")
    return facts


def checkpoint_facts(
    checkpoint_path: str | os.PathLike,
    checkpoint: Mapping[str, Any],
    model_dir: str | os.PathLike,
    lora_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """What a training checkpoint says about its model, for ``lit-embed-export``: the encoder's config, the LoRA
    settings, the step, the run's resolved config (hyper-parameters, data files, loss) and the evaluations it
    carries (the base model's and this step's metrics, when evaluated)."""
    facts = _encoder_facts(checkpoint["encoder_config"], checkpoint.get("lora_config"))
    step = int(checkpoint.get("global_step", 0))
    facts["exported_from"] = {"checkpoint": Path(checkpoint_path).name, "step": step}
    facts["steps"] = facts["step"] = step
    config = checkpoint.get("lit_embed_config") or {}
    hp = facts.setdefault("hyperparameters", {})
    _config_facts(config, facts, hp)
    callbacks = checkpoint.get("callbacks") or {}
    evaluation = callbacks.get("IREvaluationCallback") or callbacks.get("RerankEvaluationCallback") or {}
    history = evaluation.get("history", [])
    at = {entry["step"]: entry["metrics"] for entry in history}
    if step in at:
        facts["metrics"] = {"final": {**at[step], "step": step}}
        if 0 in at:
            facts["metrics"]["base"] = at[0]
        data = config.get("data") or {}
        if data.get("val_path"):
            facts["validation_data"] = Path(data["val_path"]).name
        elif "num_val" in data:
            facts["validation_data"] = "stdlib dataset (validation split)"
        elif data.get("val_fraction") and data.get("train_path"):  # held out of the training file
            facts["validation_data"] = f"{Path(data['train_path']).name} (validation split)"
        else:
            del facts["metrics"]  # scores on data the card could not name
    facts["versions"] = versions()
    facts.update(saved_model_facts(model_dir))
    facts["model_path"] = _display_path(model_dir)
    if lora_dir is not None:
        facts["lora_dir"] = _display_path(lora_dir)
    return facts


def _config_facts(config: Mapping[str, Any], facts: dict[str, Any], hp: dict[str, Any]) -> None:
    """Hyper-parameters, data files and losses from a run's resolved config (stored in its checkpoints)."""
    optimizer, scheduler = dict(config.get("optimizer") or {}), config.get("scheduler") or {}
    trainer, data = dict(config.get("trainer") or {}), dict(config.get("data") or {})
    # Values the default recipe chose (auto in the config) are recorded under "recipe".
    recipe = config.get("recipe") or {}
    for section, key, chosen in (
        (optimizer, "lr", "lr"),
        (trainer, "max_epochs", "epochs"),
        (data, "batch_size", "batch_size"),
    ):
        if section.get(key) == "auto" and chosen in recipe:
            section[key] = recipe[chosen]
    if "lr" in optimizer:
        hp["optimizer"] = str(optimizer.get("_target_", "")).rsplit(".", 1)[-1] or None
        hp["learning_rate"] = optimizer["lr"]
        if "weight_decay" in optimizer:
            hp["weight_decay"] = optimizer["weight_decay"]
    if "warmup_ratio" in scheduler:
        hp["warmup_ratio"] = scheduler["warmup_ratio"]
    if trainer.get("max_steps") not in (None, -1):
        hp["max_steps"] = trainer["max_steps"]
    elif trainer.get("max_epochs") is not None:
        hp["epochs"] = trainer["max_epochs"]
    if trainer.get("precision") is not None:
        hp["precision"] = str(trainer["precision"])
    tasks = [task.get("data") or {} for task in (data.get("tasks") or {}).values()] or [data]
    if len({task.get("batch_size") for task in tasks}) == 1 and tasks[0].get("batch_size") is not None:
        hp["batch_size"] = tasks[0]["batch_size"]
    names = [Path(task["train_path"]).name for task in tasks if task.get("train_path")]
    if names:
        facts["train_data"] = names
    losses = [task.get("loss") for task in (data.get("tasks") or {}).values()] or [config.get("loss")]
    classes = [str(loss["_target_"]).rsplit(".", 1)[-1] for loss in losses if isinstance(loss, Mapping)]
    if classes:
        facts["losses"] = list(dict.fromkeys(classes))
