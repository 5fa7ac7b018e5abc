"""Weight merging (WiSE-FT, LM-Cocktail): the model kept is an interpolation between the base and finetuned weights.

``θ = α·θ_finetuned + (1 − α)·θ_base`` for a few α, each scored on the validation set (and the guard set); α = 1 is
plain finetuning and α = 0 the base model, so the model kept is never worse on validation than the one trained from.
Merging only evaluates: a handful of validation passes after training.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lit_embed.errors import check, is_number
from lit_embed.evaluation import METRIC_NAMES
from lit_embed.training.callbacks.ir_eval import IREvaluationCallback

log = logging.getLogger(__name__)


def trainable_weights(module: nn.Module) -> dict[str, Tensor]:
    """CPU copies of the weights that train: all that interpolation needs of either end."""
    return {
        _plain_name(name): p.detach().to("cpu", copy=True)
        for name, p in module.named_parameters()
        if p.requires_grad and "lora_A" not in name
        # A LoRA update is B·A with B starting at zero: scaling B alone scales the update by exactly α, where
        # interpolating A as well would not.
    }


@torch.no_grad()
def interpolate(module: nn.Module, base: dict[str, Tensor], finetuned: dict[str, Tensor], alpha: float) -> None:
    """Sets ``module``'s weights named in ``base`` to ``α·finetuned + (1 − α)·base`` (in float32, then its dtype).

    α = 0 and α = 1 give back either end exactly.
    """
    for name, parameter in module.named_parameters():
        if (key := _plain_name(name)) in base:
            mixed = torch.lerp(base[key].float(), finetuned[key].float(), alpha)
            parameter.copy_(mixed.to(device=parameter.device, dtype=parameter.dtype))


def _plain_name(name: str) -> str:
    # FSDP wraps submodules in place; the same weight must have the same name before and after.
    return name.replace("_fsdp_wrapped_module.", "")


class WeightMerging(L.Callback):
    """Keeps the base model's trainable weights from the start of training; after it, :meth:`choose` picks α.

    Args:
        alphas: the candidates, each in [0, 1]; 1.0 = plain finetuning, 0.0 = the base model (always added).
            ``[1.0]`` turns merging off (and no copy of the base weights is kept).
        metric: the validation metric that picks α (higher is better).
        max_guard_drop: with a guard set (``eval.guard_path``), an α whose guard ``metric`` falls more than this
            below the base model's is ruled out.
        tolerance: the largest α whose validation ``metric`` is within this of the best is chosen (never one below
            the base model's), so that noise in a small validation set does not pull the model back to the base.
    """

    def __init__(
        self,
        alphas: Sequence[float] = (1.0, 0.0),
        metric: str = "ndcg@10",
        max_guard_drop: float = 0.01,
        tolerance: float = 0.005,
    ) -> None:
        check(
            isinstance(alphas, Sequence) and len(alphas) > 0 and all(is_number(a) and 0 <= a <= 1 for a in alphas),
            "alphas",
            alphas,
            "a list of weights of the finetuned model from 0 to 1, e.g. [1.0, 0.8, 0.5, 0.0]; [1.0] = no merging",
        )
        check(metric in METRIC_NAMES, "metric", metric, f"one of {', '.join(METRIC_NAMES)}")
        check(is_number(max_guard_drop) and max_guard_drop >= 0, "max_guard_drop", max_guard_drop, "a number >= 0")
        check(is_number(tolerance) and tolerance >= 0, "tolerance", tolerance, "a number >= 0")
        # The base model (α = 0) is always a candidate: what makes the export never worse than it on validation.
        self.alphas = sorted({float(a) for a in alphas} | ({0.0} if list(alphas) != [1.0] else set()), reverse=True)
        self.metric = metric
        self.max_guard_drop = float(max_guard_drop)
        self.tolerance = float(tolerance)
        self.base: dict[str, Tensor] | None = None

    @property
    def enabled(self) -> bool:
        return self.alphas != [1.0]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before a resumed run loads its checkpoint, the module still holds the base weights it was built from.
        if stage == "fit" and self.enabled and self.base is None:
            self.base = trainable_weights(pl_module.encoder)

    def choose(
        self,
        trainer: L.Trainer,
        module: L.LightningModule,
        evaluation: IREvaluationCallback,
        step: int,
        finetuned_val: dict[str, float],
    ) -> dict[str, Any] | None:
        """Scores every α, leaves ``module.encoder`` at the best one and returns ``metrics.json``'s ``"merge"``.

        The encoder must hold the finetuned weights of ``step``, whose validation metrics are ``finetuned_val``.
        None (and the encoder untouched) when merging is off or the base model was not evaluated.
        """
        base_val = evaluation.metrics_at(0)
        if not self.enabled or self.base is None or base_val is None:
            return None
        finetuned = trainable_weights(module.encoder)
        scores: dict[float, dict[str, float]] = {}
        guards: dict[float, dict[str, float] | None] = {}
        for alpha in self.alphas:
            if alpha in (0.0, 1.0):  # either end was evaluated during training
                at = 0 if alpha == 0.0 else step
                scores[alpha] = base_val if alpha == 0.0 else finetuned_val
                guards[alpha] = evaluation.metrics_at(at, "guard")
                if guards[alpha] is None and evaluation.guard is not None:
                    interpolate(module.encoder, self.base, finetuned, alpha)
                    guards[alpha] = evaluation.evaluate_guard(module)
                continue
            interpolate(module.encoder, self.base, finetuned, alpha)
            scores[alpha] = evaluation.evaluate(trainer, module)
            guards[alpha] = evaluation.evaluate_guard(module)
        base_guard = guards[0.0]  # α = 0 is always a candidate: the base model
        ruled_out = self._ruled_out(guards, base_guard)
        chosen = self._pick({a: scores[a][self.metric] for a in scores if a not in ruled_out}, base_val[self.metric])
        interpolate(module.encoder, self.base, finetuned, chosen)
        if chosen != 1.0:  # the report compares the exported model's rankings with the base model's
            evaluation.evaluate(trainer, module, step)
        merge: dict[str, Any] = {
            "metric": self.metric,
            "alphas": {str(a): scores[a] for a in self.alphas},
            "chosen": chosen,
        }
        if base_guard is not None:
            merge["guard"] = {
                "base": base_guard,
                "alphas": {str(a): guards[a] for a in self.alphas},
                "max_drop": self.max_guard_drop,
                "ruled_out": [str(a) for a in self.alphas if a in ruled_out],
            }
        return merge

    def _pick(self, allowed: dict[float, float], base: float) -> float:
        """The largest α within ``tolerance`` of the best validation score and no worse than the base model.

        A validation set of a few hundred queries moves by about a point between near-equal models: a merge has to
        beat more of the finetuning by more than that to be chosen over it. α = 0 (the base model) is never ruled
        out, so there is always a choice.
        """
        best = max(allowed.values())
        return max(a for a, score in allowed.items() if score >= best - self.tolerance and score >= base)

    def _ruled_out(
        self, guards: dict[float, dict[str, float] | None], base_guard: dict[str, float] | None
    ) -> set[float]:
        if base_guard is None:
            return set()
        floor = base_guard[self.metric] - self.max_guard_drop
        ruled_out = {a for a, guard in guards.items() if a != 0.0 and guard is not None and guard[self.metric] < floor}
        for alpha in sorted(ruled_out, reverse=True):
            log.warning(
                "merge: α=%s ruled out: guard %s %.4f is more than merge.max_guard_drop=%s below the base model's "
                "%.4f.",
                alpha,
                self.metric,
                guards[alpha][self.metric],
                self.max_guard_drop,
                base_guard[self.metric],
            )
        return ruled_out


def merge_summary(merge: dict[str, Any], finetuned: dict[str, float]) -> str:
    """One line on what was exported: which α, and what it gained on validation over plain finetuning."""
    metric, chosen = merge["metric"], merge["chosen"]
    plain, picked = finetuned[metric], merge["alphas"][str(chosen)][metric]
    if chosen == 1.0:
        return f"merge: plain finetuning (α = 1) scored best on validation {metric} ({picked:.4f}); exported as is."
    if chosen == 0.0:
        return (
            f"merge: finetuning did not help on the validation set ({metric} {plain:.4f} against the base model's "
            f"{picked:.4f}), so the exported model is the base model (α = 0). More or other data may help."
        )
    return (
        f"merge: exported α = {chosen} · finetuned + {1 - chosen:.2g} · base: validation {metric} {picked:.4f}, "
        f"plain finetuning {plain:.4f}."
    )
