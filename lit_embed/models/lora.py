"""LoRA (PEFT) on an :class:`Encoder`: low-rank updates of the transformer's linear layers train, the rest stays frozen.

The LoRA layers go into the encoder's own transformer (``encoder.model[0].auto_model``), so the result is still a
plain :class:`Encoder`: the data module, the losses, evaluation and GIST's guide (the base model, rebuilt from
``encoder.config``) use it as any other. What differs is what a run keeps and writes:

* :func:`lora_weight_names`: the weights that train, the only ones in the optimizer and in checkpoints;
* :func:`lora_config`: what rebuilds the same LoRA layers on the base model (stored in every checkpoint);
* :func:`merged_encoder`: a plain encoder with each update merged into its layer (``model/``, loads without PEFT);
* :func:`save_lora_adapter`: the updates alone, in PEFT's format (``lora/``);
* :func:`save_lora`: both, each written to a temporary folder and swapped into place.

PEFT is imported only where LoRA layers are made or saved, so every other method runs without it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_embed.errors import LitEmbedError, check, is_int, is_number
from lit_embed.files import write_directory_atomic
from lit_embed.models.encoder import Encoder
from lit_embed.models.saving import to_sentence_transformers

ADAPTER_NAME = "default"  # PEFT's name for a model's only adapter
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer of the transformer (no output head)
INSTALL = "pip install 'lit_embed[lora]'"
POOLER = r"(.*\.)?pooler(\..*)?"  # the layers of a Hugging Face pooler head, by path


class LoRA:
    """Adds LoRA layers to an encoder's transformer and freezes everything else (``method=lora``).

    Each targeted layer computes ``W x + (alpha / r) B A dropout(x)`` with ``A`` ``[r, in]`` (random) and ``B``
    ``[out, r]`` (zeros): at step 0 the encoder embeds exactly as the base model does.

    Args:
        r: the rank of each update.
        alpha: the update's scale is ``alpha / r``; None = ``2 * r``, so the scale stays 2 when you change ``r``.
        dropout: dropout on the input of each update (not on the frozen layer).
        target_modules: names of the layers to adapt (a name matches a layer whose path ends with it, as in PEFT,
            e.g. ``[query, key, value]`` or ``[q_proj, v_proj]``), ``all-linear`` (the default) for every linear layer
            but an unused pooler's (query and value alone gained about half as much: README), or None for
            PEFT's choice for the architecture (BERT: ``query``, ``value``; Llama, Qwen, Mistral: ``q_proj``,
            ``v_proj``), or every linear layer where PEFT has none.
    """

    def __init__(
        self,
        r: int = 16,
        alpha: float | None = None,
        dropout: float = 0.1,
        target_modules: str | Sequence[str] | None = "all-linear",
    ) -> None:
        check(is_int(r) and r >= 1, "lora.r", r, "a whole number >= 1, the rank of each update (8 to 64 are usual)")
        check(
            alpha is None or is_number(alpha) and alpha > 0,
            "lora.alpha",
            alpha,
            "a number > 0 (the update's scale is alpha / r), or null for 2 * r",
        )
        check(is_number(dropout) and 0 <= dropout < 1, "lora.dropout", dropout, "a probability in [0, 1)")
        self.target_modules = _target_list(target_modules)
        self.r, self.alpha, self.dropout = r, float(alpha if alpha is not None else 2 * r), float(dropout)
        _import_peft()  # a missing PEFT is said now, before the model loads

    def __call__(self, encoder: nn.Module) -> Encoder:
        """Adds the LoRA layers to ``encoder`` in place and returns it, its base weights frozen."""
        if not isinstance(encoder, Encoder):
            raise LitEmbedError(
                f"method=lora adds trainable layers inside a transformer, and a {type(encoder).__name__} has none "
                "(model=precomputed holds vectors computed elsewhere): train a head on them with method=adapter, "
                "or finetune a text model (model=minilm, model=bge, ...)."
            )
        if lora_config(encoder) is not None:
            raise LitEmbedError(
                "this model has a PEFT adapter already (model.model_name_or_path is an adapter folder): point it at "
                "the base model, or at a merged model such as a LoRA run's model/."
            )
        peft = _import_peft()
        transformer = _transformer(encoder)
        if transformer is None:
            raise LitEmbedError(
                "method=lora needs a sentence-transformers model whose first module is a Hugging Face transformer; "
                f"this one starts with a {type(encoder.model[0]).__name__}."
            )
        targets = self._targets(transformer)
        config = peft.LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            # BERT's pooler is loaded but never used by sentence-transformers: LoRA there would never train.
            exclude_modules=POOLER if targets == ALL_LINEAR else None,
            task_type=peft.TaskType.FEATURE_EXTRACTION,
        )
        encoder.requires_grad_(False)  # the pooling and any other module stay frozen too
        try:
            peft.inject_adapter_in_model(config, transformer, ADAPTER_NAME)
        except ValueError as err:  # what the check below cannot foresee, e.g. a layer type PEFT cannot adapt
            raise LitEmbedError(f"lora.target_modules={targets!r}: {str(err).splitlines()[0]}") from None
        # LoRA layers take the base's dtype; on a bf16 or fp16 base (model.dtype) they train in fp32, as PEFT's
        # get_peft_model makes them, or AdamW's small steps would round away.
        from peft.tuners.tuners_utils import cast_adapter_dtype

        cast_adapter_dtype(transformer, ADAPTER_NAME)
        return encoder

    def _targets(self, transformer: nn.Module) -> str | list[str]:
        if self.target_modules is None:
            from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_CHOICE

            return PEFT_CHOICE.get(getattr(transformer.config, "model_type", None), ALL_LINEAR)
        if self.target_modules == ALL_LINEAR:
            return ALL_LINEAR
        from transformers.pytorch_utils import Conv1D

        modules = list(transformer.named_modules())
        adaptable = [name for name, m in modules if isinstance(m, _adaptable_types())]
        unknown = [t for t in self.target_modules if not any(n == t or n.endswith(f".{t}") for n in adaptable)]
        layer_names = sorted({name.rpartition(".")[2] for name, m in modules if isinstance(m, nn.Linear | Conv1D)})
        check(
            not unknown,
            "lora.target_modules",
            self.target_modules,
            f"{', '.join(map(repr, unknown))} names none of this model's linear layers. Name some of them "
            f"({', '.join(layer_names)}), or use all-linear, or null for PEFT's choice",
        )
        return list(self.target_modules)


def _target_list(target_modules: Any) -> str | list[str] | None:
    if target_modules is None or target_modules == ALL_LINEAR:
        return target_modules
    names = [target_modules] if isinstance(target_modules, str) else target_modules
    check(
        isinstance(names, Sequence) and len(names) > 0 and all(isinstance(n, str) and n for n in names),
        "lora.target_modules",
        target_modules,
        "a list of layer names such as [query,value], all-linear, or null for PEFT's choice",
    )
    return list(names)


def _import_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise LitEmbedError(f"method=lora needs PEFT, which is not installed: {INSTALL}.") from None
    return peft


def _adaptable_types() -> tuple[type, ...]:
    """The layer types PEFT's LoRA can adapt."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)


def _transformer(encoder: nn.Module) -> nn.Module | None:
    """The Hugging Face model inside a sentence-transformers encoder, or None."""
    if not isinstance(encoder, Encoder):
        return None
    return getattr(encoder.model[0], "auto_model", None)


def lora_config(encoder: nn.Module) -> dict[str, Any] | None:
    """``{"r", "alpha", "dropout", "target_modules"}`` of the encoder's LoRA layers (None without any).

    ``target_modules`` is as PEFT resolved it, so ``LoRA(**lora_config(e))`` rebuilds the same layers even if PEFT's
    choice for the architecture changes later.
    """
    transformer = _transformer(encoder)
    configs = getattr(transformer, "peft_config", None) or {}
    if ADAPTER_NAME not in configs:
        return None
    config = configs[ADAPTER_NAME]
    targets = config.target_modules
    if not isinstance(targets, str):  # PEFT lists what all-linear matched, excluded layers (the pooler) included
        adapted = [name for name, m in transformer.named_modules() if hasattr(m, "lora_A")]
        targets = [t for t in targets if any(n == t or n.endswith(f".{t}") for n in adapted)]
    return {
        "r": config.r,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
    }


def lora_weight_names(encoder: nn.Module) -> frozenset[str] | None:
    """The names (in ``encoder.state_dict()``) of the weights that train: the LoRA matrices; None without LoRA."""
    if lora_config(encoder) is None:
        return None
    return frozenset(name for name, p in encoder.named_parameters() if p.requires_grad)


def lora_summary(encoder: nn.Module) -> str:
    """``lora: 8,192 of 2,065,728 parameters train (0.40%)``: the trained weights against all of the encoder's."""
    total = sum(p.numel() for p in encoder.parameters())
    trained = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    return f"lora: {trained:,} of {total:,} parameters train ({100 * trained / max(total, 1):.2f}%)"


def _lora_layers(encoder: Encoder) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in encoder.named_modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def merged_encoder(encoder: Encoder) -> Encoder:
    """A plain :class:`Encoder` (no PEFT layers, on the CPU) whose layers hold ``W + (alpha / r) B A``.

    The base is loaded again from ``encoder.config`` (its frozen weights are the ones trained on; a 4-bit base is
    loaded unquantized), then each LoRA update is added to its layer, as PEFT's merge does. ``encoder`` is left as
    it was.
    """
    config = dict(encoder.config)
    if config.get("load_in_4bit"):  # 4-bit weights cannot take the updates: merge into the full-precision ones
        config["load_in_4bit"] = False
    plain = Encoder(**config)
    for name, layer in _lora_layers(encoder):
        target = plain.get_submodule(name)
        target.weight += layer.get_delta_weight(ADAPTER_NAME).to(target.weight)
    return plain


def save_lora_adapter(encoder: Encoder, path: str | os.PathLike) -> None:
    """The LoRA updates alone, as PEFT saves them: ``adapter_config.json`` and ``adapter_model.safetensors``.

    ``SentenceTransformer(BASE).load_adapter(path)`` and ``PeftModel.from_pretrained(transformer, path)`` load it;
    ``base_model_name_or_path`` is the base model the run started from.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    transformer = _transformer(encoder)
    weights = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
    # PEFT's own files name each weight from the PeftModel that wraps the transformer.
    save_file(
        {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in weights.items()},
        path / "adapter_model.safetensors",
    )
    config = copy.deepcopy(transformer.peft_config[ADAPTER_NAME])
    config.base_model_name_or_path = encoder.config["model_name_or_path"]
    config.inference_mode = True
    config.save_pretrained(str(path))


def save_lora(
    encoder: Encoder, model_dir: str | os.PathLike, lora_dir: str | os.PathLike, overwrite: bool = True
) -> tuple[Path, Path]:
    """Writes the merged model to ``model_dir`` and the adapter alone to ``lora_dir``; returns both paths."""
    lora_dir = Path(lora_dir)
    if lora_dir.exists() and not overwrite:
        raise LitEmbedError(f"{lora_dir} already holds an adapter. Choose another folder or set overwrite=true.")
    model_dir = to_sentence_transformers(merged_encoder(encoder), model_dir, overwrite)
    try:
        write_directory_atomic(lora_dir, lambda staging: save_lora_adapter(encoder, staging))
    except OSError as err:
        raise LitEmbedError(
            f"could not write the LoRA adapter to {lora_dir}: {err.strerror or err}. The merged model is in "
            f"{model_dir}; free disk space or fix permissions, then export a checkpoint with lit-embed-export."
        ) from err
    return model_dir, lora_dir
