"""The one check of a model path that every loader of lit_embed makes before it loads anything.

Training (the Hydra app, ``lit-embed fit``), ``lit-embed-eval``, ``-export``, ``-mine`` and ``-score`` all call
:func:`check_model_folder` first and load inside :func:`loading_errors`, so a path that is missing or is not a
model, or a model that would run its own code, is one message naming the path and the fix, never a traceback, and no
code from the folder runs unless trust_remote_code is set.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError
from transformers import CONFIG_MAPPING

from lit_embed.errors import LitEmbedError

TRUST_FIX = "set model.trust_remote_code=true"
MODEL_KINDS = (
    "Give a sentence-transformers model folder (with modules.json) or a Hugging Face one "
    "(config.json with a model_type)"
)


def check_model_folder(
    path: str | os.PathLike, trust_remote_code: bool = False, what: str = "model path", fix: str = TRUST_FIX
) -> None:
    """Refuses a local model path that is missing, is not a model, or names code that loading would run.

    A local path must be a folder that sentence-transformers can load: a sentence-transformers folder
    (``modules.json``, a ``CrossEncoder``'s too) or a Hugging Face one (``config.json`` with a ``model_type``, a
    cross-encoder's ``...ForSequenceClassification`` too). Without ``trust_remote_code``, module classes from outside
    sentence-transformers (:func:`check_module_classes`) and Hugging Face custom code (an ``auto_map`` for a model
    type transformers does not know) are refused.
    A name that does not look like a path and is not here is a hub id: it is left to the loader, whose errors
    :func:`loading_errors` reports.

    Args:
        path: the model path or hub id, as the user gave it.
        trust_remote_code: allow code from the folder or from outside sentence-transformers.
        what: what the user set, for the messages (``model path``, ``--teacher``).
        fix: how to allow custom code, in the user's terms (``pass --trust-remote-code``).
    """
    name = str(path)
    folder = Path(name)
    if not folder.exists():
        if not looks_like_a_path(name):
            return
        raise LitEmbedError(f"{what} {name} does not exist. {MODEL_KINDS}, or a hub id on a machine with hub access.")
    if not folder.is_dir():
        ckpt = folder.suffix == ".ckpt"
        exported = " A lit_embed checkpoint becomes one with `lit-embed-export CKPT OUT_DIR`." if ckpt else ""
        raise LitEmbedError(f"{what} {name} is a file, not a model folder. {MODEL_KINDS}.{exported}")
    if (folder / "modules.json").is_file():
        check_module_classes(folder, trust_remote_code, fix)
        configs = [folder / sub / "config.json" for sub in _transformer_folders(folder)]
        configs = [config for config in configs if config.is_file()]  # a missing one is the loader's message
    elif (folder / "config.json").is_file():
        configs = [folder / "config.json"]
    else:
        run = " It looks like a run's output directory: give its model/ folder." if (folder / "model").is_dir() else ""
        raise LitEmbedError(
            f"{what} {name} is not a model folder: it has neither modules.json (sentence-transformers) nor config.json "
            f"(Hugging Face). {MODEL_KINDS}.{run}"
        )
    for config in configs:
        _check_transformers_config(config, folder, what, trust_remote_code, fix)


@contextmanager
def loading_errors(name: str, fix: str = TRUST_FIX) -> Iterator[None]:
    """What a loader raises about the model itself, as one message naming it.

    :func:`check_model_folder` cannot see inside a hub id, nor into the weights: a hub id that is not there (or no
    hub to ask), damaged or incomplete weights, and a hub model's custom code without trust_remote_code.
    """
    try:
        yield
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        reason = str(err).splitlines()[0].rstrip(" .")  # names the model and the code
        raise LitEmbedError(f"{reason}. If you trust this model's code, {fix}; otherwise use another model.") from None
    except (OSError, SafetensorError) as err:
        reason = str(err).splitlines()[0].rstrip(" .") or type(err).__name__
        if Path(name).exists():
            then = "Its files are damaged or incomplete: save or download the model again."
        else:
            then = "Check the hub id, or run where the Hugging Face hub (or a cache holding the model) can be reached."
        raise LitEmbedError(f"could not load the model {name} ({reason}). {then}") from None


def check_module_classes(path: str | os.PathLike, trust_remote_code: bool = False, fix: str = TRUST_FIX) -> None:
    """Refuses a local sentence-transformers directory that names code from outside sentence-transformers.

    Loading imports every class ``modules.json`` (and a ``Router``'s ``router_config.json``) names, and every
    ``Dense`` activation: code that runs on load, from an installed package or from the model directory itself.
    Classes under ``sentence_transformers.`` and the ``torch.nn`` modules sentence-transformers writes for a
    ``Dense`` activation are trusted; anything else needs ``trust_remote_code``. ``fix`` says how to give it.
    """
    model_dir = Path(path)
    if trust_remote_code or not (model_dir / "modules.json").is_file():
        return
    for file, what, name in _named_classes(model_dir, model_dir / "modules.json"):
        trusted = name.startswith("sentence_transformers.") if what == "module class" else _is_torch_module(name)
        if not trusted:
            raise LitEmbedError(
                f"{file} names the {what} {name!r}, which is not part of "
                f"{'sentence-transformers' if what == 'module class' else 'torch.nn'}: loading the model would run "
                f"its code. If you trust the code of {model_dir}, {fix}; otherwise use another model."
            )


def read_json(file: Path) -> object:
    """A model file's JSON; one that is not is an error naming it."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LitEmbedError(
            f"{file} could not be read as JSON ({err}). Save the model again with sentence-transformers, or give "
            "another model folder."
        ) from None


def looks_like_a_path(name: str) -> bool:
    # A hub id is "org/name" or "name"; anything absolute, relative-dotted or deeper is a local path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _check_transformers_config(file: Path, model_dir: Path, what: str, trust_remote_code: bool, fix: str) -> None:
    """A Hugging Face ``config.json``: a ``model_type``, and no custom code (``auto_map``) unless trusted."""
    config = read_json(file)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):  # transformers picks the model's class by it
        raise LitEmbedError(
            f"{what} {model_dir} is not a model folder: its {file.relative_to(model_dir)} has no model_type, which "
            f"every Hugging Face model's has (is it another program's config.json?). {MODEL_KINDS}."
        )
    auto_map = config.get("auto_map")
    # A model type transformers has its own classes for loads with them, none of the folder's code (as transformers
    # does without trust_remote_code); any other is built by the classes auto_map names, from the folder's files.
    if not auto_map or trust_remote_code or model_type in CONFIG_MAPPING:
        return
    entries = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
    names = sorted({str(c) for entry in entries for c in (entry if isinstance(entry, list) else [entry]) if c})
    raise LitEmbedError(
        f"{file} names custom code in its auto_map ({', '.join(map(repr, names))}) for its model_type {model_type!r}, "
        f"which transformers does not know: loading the model would run that code. If you trust the code of "
        f"{model_dir}, {fix}; otherwise use another model."
    )


def _transformer_folders(model_dir: Path) -> list[str]:
    """The folders (relative to ``model_dir``) of the Hugging Face transformers that ``modules.json`` lists."""
    entries = read_json(model_dir / "modules.json")  # its shape is checked already (check_module_classes)
    return [str(e.get("path", "")) for e in entries if str(e["type"]).rpartition(".")[2] == "Transformer"]


def _named_classes(model_dir: Path, file: Path) -> Iterator[tuple[Path, str, str]]:
    """(file, "module class" or "activation function", dotted name) for every class that loading imports."""
    entries = read_json(file)
    if file.name == "modules.json":
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "type" in e for e in entries):
            raise LitEmbedError(
                f"{file} is not a sentence-transformers module list (a JSON list of {{'path', 'type'}} objects). "
                "Save the model again with sentence-transformers, or remove the file to load a plain transformer."
            )
        modules = [(model_dir / str(e.get("path", "")), e["type"]) for e in entries]
    else:  # a Router's config: {"types": {subfolder: class}}
        types = entries.get("types", {}) if isinstance(entries, dict) else {}
        modules = [(file.parent / str(sub), name) for sub, name in types.items()] if isinstance(types, dict) else []
    for folder, name in modules:
        yield file, "module class", str(name)
        kind = str(name).rpartition(".")[2]
        if kind in ("Router", "Asym"):
            config = folder / "router_config.json"
            config = config if config.is_file() else folder / "config.json"
            if config.is_file():
                yield from _named_classes(model_dir, config)
        elif kind == "Dense" and (folder / "config.json").is_file():
            activation = read_json(folder / "config.json")
            if isinstance(activation, dict) and "activation_function" in activation:
                yield folder / "config.json", "activation function", str(activation["activation_function"])


def _is_torch_module(name: str) -> bool:
    """A ``torch.nn`` module class, as sentence-transformers writes a ``Dense`` activation (``torch.nn.Tanh``)."""
    module, _, attr = name.rpartition(".")
    if module != "torch.nn" and not module.startswith("torch.nn."):
        return False
    from torch import nn  # here: lit-embed-score checks a teacher before it imports torch

    try:
        value = getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return False
    return isinstance(value, type) and issubclass(value, nn.Module)
