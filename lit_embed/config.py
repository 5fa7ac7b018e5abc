"""From a Hydra config to objects: where the configs are, and every config mistake as one clear error.

Used by the Hydra app (``lit_embed.train``), ``lit_embed.finetune``, the LightningCLI (its precision default) and
the tests. The configs live in the repository's ``conf/``, shipped inside the package as ``lit_embed/conf``.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import typing
from collections.abc import Iterable, Iterator, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from typing_extensions import Unpack

from lit_embed.errors import InvalidValueError, LitEmbedError, check, is_bool, is_int, is_number, user_error_behind
from lit_embed.evaluation import DEFAULT_METRIC

CONFIG_DIR = str(files("lit_embed") / "conf")


def bf16_if_gpu() -> str:
    """Lightning precision for ``trainer=default``: bf16 autocast where the GPU supports it, else fp32."""
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def validation_metric(name: str | None) -> str:
    """The logged name of a validation metric (``val/ndcg@10``); None picks the default metric."""
    return f"val/{name or DEFAULT_METRIC}"


def register_resolvers() -> None:
    """The ``${bf16_if_gpu:}`` and ``${validation_metric:NAME}`` resolvers the configs use (idempotent)."""
    OmegaConf.register_new_resolver("bf16_if_gpu", bf16_if_gpu, replace=True)
    OmegaConf.register_new_resolver("validation_metric", validation_metric, replace=True)


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """``conf/train.yaml`` with ``overrides`` applied, as ``python train.py OVERRIDES`` composes it."""
    register_resolvers()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def check_added_keys(cfg: DictConfig, overrides: Iterable[str]) -> None:
    """Refuses a key added with ``+`` that no part of the run reads, naming the nearest key that is read.

    Hydra adds any such key without a word, so a typo there (``+optimiser.lr=1e-4``, the form Hydra's own message
    suggests after a typo without ``+``) would leave the setting as it was. A key is read when it is an argument of
    the constructor a ``_target_`` above it names (one that takes ``**kwargs`` reads any), or a new entry of
    ``callbacks`` (each is built). ``++`` may also change an existing key, so it is checked only below a
    ``_target_``; a config group (``+experiment=NAME``) and ``hydra.*`` (Hydra checks its own) are not keys.
    """
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if not (override.is_add() or override.is_force_add()) or key.startswith("hydra.") or _is_group(key):
            continue
        parts = key.split(".")
        built = max((i for i in range(len(parts)) if _target_at(cfg, parts[:i])), default=None)
        if built is None:
            if override.is_force_add() or parts[0] == "callbacks" and len(parts) == 2:
                continue
            candidates = [k for k in _dotted_keys(cfg) if k != key and not k.startswith(key + ".")]
        else:
            accepted = _arguments(_target_at(cfg, parts[:built]))
            if accepted is None or parts[built] in accepted or parts[built] in HYDRA_KEYS:
                continue
            where = ".".join(parts[:built])
            candidates = [f"{where}.{name}" for name in accepted]
        nearest = difflib.get_close_matches(key, candidates, n=1, cutoff=0.75)
        value = override.get_value_element_as_str()
        given = f"{'++' if override.is_force_add() else '+'}{key}={value}"
        hint = ""
        if nearest:
            exists = OmegaConf.select(cfg, nearest[0], default=_ABSENT) is not _ABSENT
            hint = f" Did you mean {nearest[0]}? Write {'' if exists else '+'}{nearest[0]}={value}" + (
                " (without +: that key is in the config already)." if exists else "."
            )
        raise LitEmbedError(
            f"{given}: no part of the run reads {key}, so it would change nothing.{hint or ' Remove it.'}"
        )


_ABSENT = object()
# What Hydra reads at a node it builds, beside the constructor's arguments.
HYDRA_KEYS = {"_target_", "_partial_", "_args_", "_recursive_", "_convert_"}


def _is_group(key: str) -> bool:
    return (Path(CONFIG_DIR) / key.replace(".", "/")).is_dir()


def _target_at(cfg: DictConfig, parts: list[str]) -> str | None:
    """The ``_target_`` of the node at ``parts`` (None where it has none, or is no node)."""
    node = OmegaConf.select(cfg, ".".join(parts), default=None) if parts else cfg
    return node.get("_target_") if isinstance(node, DictConfig) else None


def _arguments(target: str) -> set[str] | None:
    """The argument names ``target`` takes; None when it takes any, or cannot be imported here (the build names what
    is wrong with it then). A class whose ``**kwargs`` go to its base (``super().__init__(**kwargs)``) takes the
    base's too, up to the first ``__init__`` without them."""
    try:
        found = get_object(target)
    except (ImportError, AttributeError, ValueError, InstantiationException):
        return None
    names: set[str] = set()
    for function in [c.__init__ for c in found.__mro__ if c is not object] if isinstance(found, type) else [found]:
        try:
            parameters = inspect.signature(function).parameters.values()
        except (ValueError, TypeError):
            return None
        names |= {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self"}
        declared = _declared_keywords(function)
        if declared is not None:
            return names | declared
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return names
    return None


def _declared_keywords(function: Any) -> set[str] | None:
    """The names ``**kwargs: Unpack[SomeTypedDict]`` declares (None: no such ``**kwargs``)."""
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except (NameError, TypeError, AttributeError):  # an annotation that does not resolve here declares nothing
        return None
    for hint in hints.values():
        if typing.get_origin(hint) is Unpack:
            return set(typing.get_type_hints(typing.get_args(hint)[0]))
    return None


def _dotted_keys(node: Any, prefix: str = "") -> Iterator[str]:
    """Every key of a config, dotted (``optimizer.lr``), nodes and leaves, without resolving any value."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, dict):
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            yield dotted
            yield from _dotted_keys(value, dotted)


def build(config: Any, key: str = "", **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, with every error a constructor raises turned into one ``LitEmbedError``.

    The error names the config key (``data.batch_size=0 is not allowed: ...``); ``HYDRA_FULL_ERROR=1`` shows the
    original traceback instead.
    """
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise _config_error(err, key) from None
    except MissingMandatoryValue as err:
        raise LitEmbedError(f"{err.full_key} has no value: set it on the command line ({err.full_key}=...).") from None
    except OmegaConfBaseException as err:
        raise LitEmbedError(
            f"{str(err).splitlines()[0]}. Fix the value in the config or on the command line."
        ) from None


def _config_error(err: InstantiationException, key: str) -> LitEmbedError:
    match = re.search(r"full_key: (\S+)", str(err))
    full_key = match.group(1) if match else key
    user_error = user_error_behind(err)
    if isinstance(user_error, InvalidValueError):
        # A bare argument name is the constructor's; a dotted key was already named in full by whoever raised it.
        key = f"{full_key}.{user_error.key}" if full_key and "." not in user_error.key else user_error.key
        return InvalidValueError(key, user_error.value, user_error.allowed)
    if user_error is not None:
        return user_error
    reason = str(err.__cause__ or err).strip().rstrip(".")
    return LitEmbedError(f"{full_key or 'config'}: {reason}. Fix the settings under {full_key or 'the config'}.")


def check_output_dir(output_dir: Any) -> None:
    """An empty output_dir would put the model and checkpoints in the current directory."""
    check(
        isinstance(output_dir, str) and bool(output_dir.strip()),
        "output_dir",
        output_dir,
        "a folder for everything the run writes, e.g. output_dir=runs/mine",
    )


TRAINER_SWITCHES = (
    "enable_checkpointing",
    "enable_model_summary",
    "enable_progress_bar",
    "benchmark",
    "use_distributed_sampler",
    "detect_anomaly",
    "inference_mode",
    "barebones",
    "sync_batchnorm",
)


def check_logger(logger: DictConfig | None) -> None:
    """Lightning's loggers turn any value into a folder or run name; a number or a flag there is a typo."""
    if not logger:
        return
    for key in ("save_dir", "name", "experiment_name", "run_name", "tracking_uri"):
        value = logger.get(key)
        check(value is None or isinstance(value, str), f"logger.{key}", value, "a text (quote it), or null")
    version = logger.get("version")
    check(
        version is None or isinstance(version, str) or is_int(version) and version >= 0,
        "logger.version",
        version,
        "a whole number >= 0 or a name, or null for the next free version",
    )
    hp_metric = logger.get("default_hp_metric")
    check(hp_metric is None or is_bool(hp_metric), "logger.default_hp_metric", hp_metric, "true or false")


def check_run_settings(cfg: DictConfig) -> None:
    """The top-level and ``trainer`` values that no constructor of ours checks."""
    check(is_int(cfg.seed) and 0 <= cfg.seed < 2**32, "seed", cfg.seed, "a whole number from 0 to 2**32 - 1")
    for key in ("overwrite", "load_best_model_at_end", "resume_changed"):
        check(is_bool(cfg.get(key, False)), key, cfg.get(key), "true or false")
    check(
        cfg.resume is None or isinstance(cfg.resume, bool | str),
        "resume",
        cfg.resume,
        "true (this output_dir's last.ckpt), auto (that checkpoint where there is one, else a new start), the "
        "path of a .ckpt file, or null",
    )
    trainer = cfg.trainer
    epochs, steps = trainer.get("max_epochs"), trainer.get("max_steps", -1)
    check(
        epochs is None or epochs == "auto" or is_int(epochs) and (epochs >= 1 or epochs == -1),
        "trainer.max_epochs",
        epochs,
        "a whole number of epochs >= 1, auto (the default recipe's), or -1 with trainer.max_steps set",
    )
    check(
        is_int(steps) and (steps >= 1 or steps == -1),
        "trainer.max_steps",
        steps,
        "a whole number of optimizer steps >= 1, or -1 for no limit",
    )
    check(
        epochs not in (None, -1) or steps != -1,
        "trainer.max_epochs",
        epochs,
        "a number of epochs, unless trainer.max_steps limits the run",
    )
    clip = trainer.get("gradient_clip_val")
    check(clip is None or is_number(clip) and clip >= 0, "trainer.gradient_clip_val", clip, "a number >= 0, or null")
    for name in ("log_every_n_steps", "accumulate_grad_batches"):
        value = trainer.get(name, 1)
        check(is_int(value) and value >= 1, f"trainer.{name}", value, "a whole number >= 1")
    # Lightning takes any truthy value for its switches; a typo there would silently mean "on".
    for name in TRAINER_SWITCHES:
        value = trainer.get(name)
        check(value is None or is_bool(value), f"trainer.{name}", value, "true or false")
    deterministic = trainer.get("deterministic")
    check(deterministic in (None, True, False, "warn"), "trainer.deterministic", deterministic, "true, false or warn")
    check_logger(cfg.get("logger"))
    sanity = trainer.get("num_sanity_val_steps")
    check(
        sanity is None or is_int(sanity) and sanity >= -1,
        "trainer.num_sanity_val_steps",
        sanity,
        "a whole number of validation batches >= 0, or -1 for all",
    )
