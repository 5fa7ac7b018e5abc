"""Small shared builders for the tests."""

from __future__ import annotations

from pathlib import Path

from lit_embed.config import compose_config
from lit_embed.data.formats import save_llamaindex_json
from lit_embed.data.schema import QADataset

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["sort a list", "open a file", "parse json", "join paths", "read csv", "format dates", "hash bytes"]


def toy_split(n: int, offset: int = 0) -> QADataset:
    """``n`` queries, each with its own short code document (ids q<i> / d<i>)."""
    queries, corpus, relevant = {}, {}, {}
    for i in range(offset, offset + n):
        topic = TOPICS[i % len(TOPICS)]
        queries[f"q{i}"] = f"how do I {topic} number {i}?"
        corpus[f"d{i}"] = f"def helper_{i}():\n    # {topic} variant {i}\n    return {i}"
        relevant[f"q{i}"] = [f"d{i}"]
    return QADataset(queries, corpus, relevant)


def write_toy_data(directory: Path, num_train: int = 48, num_val: int = 20) -> tuple[Path, Path]:
    train, val = directory / "train.json", directory / "val.json"
    save_llamaindex_json(toy_split(num_train), train)
    save_llamaindex_json(toy_split(num_val, offset=1000), val)
    return train, val


def compose_train(overrides: list[str]):
    return compose_config(overrides)


def tiny_run_overrides(train: Path, val: Path | None, output_dir: Path, **extra: object) -> list[str]:
    """A few-step tiny-model CPU run on the toy data; ``extra`` adds or replaces key=value overrides."""
    values: dict[str, object] = {
        "data.train_path": train,
        "data.val_path": val if val is not None else "null",
        "data.batch_size": 8,
        "trainer.max_steps": 4,
        "trainer.log_every_n_steps": 1,
        "optimizer.lr": 1e-3,
        "merge.alphas": "[1.0]",  # the model trained is the model exported (tests/test_recipe.py merges)
        "output_dir": output_dir,
    }
    values.update(extra)
    return ["model=tiny", "data=qa_json", "trainer=cpu"] + [f"{k}={v}" for k, v in values.items()]


def trained_encoders(monkeypatch) -> list:
    """Catches each run's trained encoder as the run hands it to ``finish`` (which exports it)."""
    import lit_embed.train

    trained = []
    finish = lit_embed.train.finish

    def spy(trainer, module, *args, **kwargs):
        trained.append(module.encoder)
        return finish(trainer, module, *args, **kwargs)

    monkeypatch.setattr(lit_embed.train, "finish", spy)
    return trained
