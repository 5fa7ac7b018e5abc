"""The default recipe: epochs, learning rate and batch size from the number of training pairs and the model's size.

A config value of ``auto`` (``trainer.max_epochs``, ``optimizer.lr``, ``data.batch_size``: the defaults of full
finetuning) is filled in by :func:`default_recipe` once the data and the model are loaded; any value set by hand is
kept. The rule was found by experiment (``benchmarks/recipe_experiments.py``, README "The default recipe"):

- batch 32: three times LlamaIndex's in-batch negatives, at the same cost per pair on a CPU (smaller only when
  there are fewer pairs than that);
- epochs: 2 up to 10,000 pairs, then 1: at lr 1e-4, 2 epochs did better than 3 at 5e-5 in two thirds of the time,
  large sets get enough steps in one, and the run stays shorter than LlamaIndex's two epochs at batch 10;
- learning rate 1e-4 for a model of all-MiniLM-L6-v2's 23M parameters (it beat 5e-5 there), scaled by 1/√size
  (4.6e-5 at bge-base's 109M, 2.6e-5 at 335M), and never below 1e-5;
- warmup: the scheduler's 10% of the steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

AUTO = "auto"
REFERENCE_PARAMETERS = 22_700_000  # all-MiniLM-L6-v2, where the learning rate was measured
REFERENCE_LR = 1e-4
MIN_LR = 1e-5
BATCH_SIZE = 32
EPOCHS_BY_PAIRS = ((10_000, 2),)  # (at most this many pairs, epochs); more pairs: 1 epoch


@dataclass(frozen=True)
class Recipe:
    epochs: int
    lr: float
    batch_size: int


def default_recipe(num_pairs: int, num_parameters: int) -> Recipe:
    """The recipe for ``num_pairs`` training pairs (rows) and a model of ``num_parameters`` trainable weights."""
    epochs = next((e for most, e in EPOCHS_BY_PAIRS if num_pairs <= most), 1)
    lr = max(MIN_LR, REFERENCE_LR * math.sqrt(REFERENCE_PARAMETERS / max(num_parameters, 1)))
    return Recipe(epochs=epochs, lr=float(f"{lr:.2g}"), batch_size=max(1, min(BATCH_SIZE, num_pairs)))


def explain(recipe: Recipe, num_pairs: int, num_parameters: int, chosen: set[str]) -> str:
    """The line printed at the start of a run: what the recipe chose, and why."""
    values = {
        "trainer.max_epochs": f"{recipe.epochs} epoch{'s' * (recipe.epochs != 1)}",
        "optimizer.lr": f"lr {recipe.lr:.1e}",
        "data.batch_size": f"batch {recipe.batch_size}",
    }
    reasons = {
        "trainer.max_epochs": f"{num_pairs:,} training pairs (2 epochs up to 10,000, then 1)",
        "optimizer.lr": f"{num_parameters / 1e6:.0f}M trainable parameters (1e-4 at 23M, scaled by 1/√size)",
        "data.batch_size": "32 pairs a batch"
        + (f", at most the {num_pairs} pairs there are" if num_pairs < 32 else ""),
    }
    picked = [key for key in values if key in chosen]
    return (
        f"recipe: {', '.join(values[k] for k in picked)}, because {'; '.join(reasons[k] for k in picked)}. "
        f"Set {' / '.join(picked)} to choose yourself."
    )
