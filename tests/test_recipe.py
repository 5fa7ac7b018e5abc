"""The default recipe, the held-out validation slice, weight merging and the forgetting guard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import compose_train, tiny_run_overrides, toy_split, write_toy_data

from lit_embed.data.formats import dataset_rows, save_llamaindex_json
from lit_embed.data.schema import MAX_HELD_OUT_QUERIES, QADataset
from lit_embed.errors import LitEmbedError
from lit_embed.evaluation.retrieval import format_metrics_table
from lit_embed.train import run
from lit_embed.training.merging import WeightMerging, interpolate, trainable_weights
from lit_embed.training.recipe import default_recipe


# The recipe
def test_recipe_epochs_shrink_as_the_data_grows_and_lr_as_the_model_grows() -> None:
    minilm = 22_700_000
    assert [default_recipe(n, minilm).epochs for n in (300, 2_000, 10_000, 10_001, 10**7)] == [2, 2, 2, 1, 1]
    assert default_recipe(1500, minilm).lr == pytest.approx(1e-4)
    assert default_recipe(1500, 109_000_000).lr == pytest.approx(4.6e-5)
    assert default_recipe(1500, 8_000_000_000).lr == 1e-5  # the floor
    assert default_recipe(1500, minilm).batch_size == 32
    assert default_recipe(20, minilm).batch_size == 20  # never more than the pairs there are


def test_auto_values_are_filled_and_printed_and_set_values_kept(tmp_path: Path, caplog) -> None:
    caplog.set_level("INFO")
    train, val = write_toy_data(tmp_path, num_train=48)
    overrides = tiny_run_overrides(train, val, tmp_path / "run", **{"trainer.max_steps": 2})
    overrides = [o for o in overrides if not o.startswith(("data.batch_size=", "optimizer.lr="))]
    cfg = compose_train(overrides)
    assert cfg.data.batch_size == cfg.optimizer.lr == cfg.trainer.max_epochs == "auto"
    run(cfg)
    out = caplog.text
    assert "recipe: 2 epochs, lr " in out and "batch 32, because 48 training pairs" in out
    assert cfg.trainer.max_epochs == 2 and cfg.optimizer.lr > 1e-4  # the tiny model is smaller than MiniLM

    cfg = compose_train(tiny_run_overrides(train, val, tmp_path / "set", **{"trainer.max_steps": 2}))
    caplog.clear()
    run(cfg)
    out = caplog.text
    assert "recipe: 2 epochs, because 48 training pairs" in out and "lr" not in out.split("recipe:")[1].split("\n")[0]
    assert cfg.optimizer.lr == 1e-3 and cfg.data.batch_size == 8


def test_a_resume_with_auto_epochs_continues_the_recipes_run(tmp_path: Path) -> None:
    train, val = write_toy_data(tmp_path, num_train=48)
    out = tmp_path / "run"
    # 48 pairs, batch 8: 6 steps an epoch, 2 epochs; stop after 7, then resume to the recipe's end (12 steps).
    first = run(compose_train(tiny_run_overrides(train, val, out, **{"trainer.max_steps": 7})))
    assert first["final"]["step"] <= 7
    resumed = run(
        compose_train(
            tiny_run_overrides(train, val, out, **{"trainer.max_steps": -1, "resume": "true", "overwrite": "true"})
        )
    )
    log = (out / "logs").rglob("metrics.csv")
    steps = [int(line.split(",")[1]) for f in log for line in f.read_text().splitlines()[1:] if line.split(",")[1]]
    assert max(steps) == 12
    assert json.loads((out / "metrics.json").read_text()) == resumed


# The held-out validation slice
def test_held_out_queries_leave_training_and_keep_their_documents(tmp_path: Path) -> None:
    data = toy_split(400)
    data.queries["dup"] = data.queries["q7"]  # the same text under another id goes with it
    data.relevant_docs["dup"] = ["d8"]
    data.relevant_docs["q9"] = ["d9", "d10"]  # a row trains on d9 only; validation counts both
    rows = dataset_rows(data, cache_dir=tmp_path)
    train, val = rows.hold_out(0.1, seed=3, source="train.json")
    assert val is not None and len(val.queries) == 40
    held_texts = set(val.queries.values())
    trained_texts = {train.queries.text(q) for q in train.query.tolist()}
    assert not held_texts & trained_texts and len(held_texts | trained_texts) == 400
    assert len(train) == len(rows) - sum(data.queries[q] in held_texts for q in data.relevant_docs)
    for qid, text in val.queries.items():
        relevant = {val.corpus[d] for d in val.relevant_docs[qid]}
        expected = {data.corpus[d] for q, docs in data.relevant_docs.items() if data.queries[q] == text for d in docs}
        assert relevant == expected  # every relevant document, of every id with that text
    assert set(val.corpus) == {d for docs in val.relevant_docs.values() for d in docs}
    assert train.documents is rows.documents  # documents stay where other queries may train on them
    assert rows.hold_out(0.1, seed=3, source="x")[1] == val  # the seed decides
    assert rows.hold_out(0.1, seed=4, source="x")[1] != val


def test_too_small_data_keeps_every_query_and_says_so(tmp_path: Path, caplog) -> None:
    rows = dataset_rows(toy_split(150), cache_dir=tmp_path)
    train, val = rows.hold_out(0.1, seed=0, source="small.json")
    assert val is None and train is rows
    assert "small.json: no data.val_path, and only 150 distinct queries" in caplog.text


def test_held_out_slice_is_capped(tmp_path: Path) -> None:
    data = QADataset(
        {f"q{i}": f"query {i}" for i in range(12_000)}, {"d": "doc"}, {f"q{i}": ["d"] for i in range(12_000)}
    )
    rows = dataset_rows(data, cache_dir=tmp_path)
    assert len(rows.hold_out(0.5, seed=0, source="x")[1].queries) == MAX_HELD_OUT_QUERIES


def test_a_run_without_val_path_validates_on_a_held_out_slice(tmp_path: Path) -> None:
    train = tmp_path / "train.json"
    save_llamaindex_json(toy_split(300), train)
    metrics = run(compose_train(tiny_run_overrides(train, None, tmp_path / "run", **{"data.val_fraction": 0.1})))
    assert metrics["base"] and metrics["final"]
    held = run(compose_train(tiny_run_overrides(train, None, tmp_path / "off", **{"data.val_fraction": 0})))
    assert held == {}


# Weight merging
def test_interpolation_gives_either_end_exactly_and_the_line_between(tiny_encoder) -> None:
    base = trainable_weights(tiny_encoder)
    with torch.no_grad():
        for p in tiny_encoder.parameters():
            p.add_(torch.randn_like(p))
    finetuned = trainable_weights(tiny_encoder)
    name = next(iter(base))
    for alpha in (0.0, 0.3, 1.0):
        interpolate(tiny_encoder, base, finetuned, alpha)
        now = dict(tiny_encoder.named_parameters())[name].detach()
        expected = {0.0: base[name], 1.0: finetuned[name]}.get(alpha, 0.7 * base[name] + 0.3 * finetuned[name])
        assert torch.allclose(now, expected, atol=1e-6 if alpha == 0.3 else 0)


def test_lora_merging_scales_the_update(tiny_model_path: str) -> None:
    pytest.importorskip("peft")
    from lit_embed.models.encoder import Encoder
    from lit_embed.models.lora import LoRA

    encoder = LoRA(r=4, target_modules="all-linear")(Encoder(tiny_model_path))
    base = trainable_weights(encoder)
    assert base and not any("lora_A" in name for name in base)
    with torch.no_grad():
        for p in encoder.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    finetuned = trainable_weights(encoder)
    texts = ["how do I sort a list", "def f():\n    return 1"]
    encoder.eval()
    plain = encoder.encode(texts, "document")
    interpolate(encoder, base, finetuned, 0.0)
    lora_a_kept = encoder.encode(texts, "document")
    interpolate(encoder, base, finetuned, 1.0)
    assert torch.allclose(encoder.encode(texts, "document"), plain)
    # B = 0 switches every update off: the base model's embeddings, whatever A holds.
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "lora_B" in name:
                p.zero_()
    assert torch.allclose(encoder.encode(texts, "document"), lora_a_kept, atol=1e-6)


def test_merging_settings_are_checked() -> None:
    for bad in ({"alphas": []}, {"alphas": [1.5]}, {"metric": "mrr@7"}, {"max_guard_drop": -1}):
        with pytest.raises(LitEmbedError):
            WeightMerging(**bad)
    assert WeightMerging(alphas=[0.5, 1, 0.5]).alphas == [1.0, 0.5, 0.0]  # the base model is always a candidate
    assert not WeightMerging(alphas=[1.0]).enabled


def test_a_run_exports_the_best_alpha_and_reports_every_one(tmp_path: Path, capsys) -> None:
    train, val = write_toy_data(tmp_path, num_train=48)
    out = tmp_path / "run"
    metrics = run(compose_train(tiny_run_overrides(train, val, out, **{"merge.alphas": "[1.0,0.5,0.0]"})))
    merge = metrics["merge"]
    assert set(merge["alphas"]) == {"1.0", "0.5", "0.0"}
    assert merge["alphas"]["0.0"] == metrics["base"] and merge["alphas"]["1.0"] == {
        k: v for k, v in metrics["finetuned"].items() if k != "step"
    }
    scores = {float(a): m["ndcg@10"] for a, m in merge["alphas"].items()}
    near_best = [a for a, v in scores.items() if v >= max(scores.values()) - 0.005 and v >= scores[0.0]]
    assert merge["chosen"] == max(near_best) == metrics["final"]["alpha"]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    printed = capsys.readouterr().out
    assert "base finetuned     final    change" in printed and "merge: " in printed
    # The exported model is the chosen α's: scoring it again gives the reported metrics.
    from lit_embed.evaluate import evaluate

    exported = evaluate(out / "model", val, device="cpu")
    assert exported["ndcg@10"] == pytest.approx(metrics["final"]["ndcg@10"], abs=1e-5)


def test_finetuning_that_hurts_exports_the_base_model(tmp_path: Path, capsys) -> None:
    train, val = write_toy_data(tmp_path, num_train=48)
    # A learning rate that wrecks the tiny model: validation falls, α = 0 wins.
    overrides = tiny_run_overrides(train, val, tmp_path / "run", **{"optimizer.lr": 0.5, "merge.alphas": "[1.0,0.0]"})
    metrics = run(compose_train(overrides + ["trainer.gradient_clip_val=null", "load_best_model_at_end=false"]))
    assert metrics["finetuned"]["ndcg@10"] < metrics["base"]["ndcg@10"]
    assert metrics["final"]["alpha"] == 0.0
    assert {k: v for k, v in metrics["final"].items() if k not in ("step", "alpha")} == metrics["base"]
    assert "finetuning did not help" in capsys.readouterr().out


def test_the_guard_rules_out_alphas_that_forget(tmp_path: Path, caplog) -> None:
    train, val = write_toy_data(tmp_path, num_train=48)
    guard = tmp_path / "guard.json"
    save_llamaindex_json(toy_split(30, offset=5000), guard)
    # A negative allowed drop would rule out everything but α = 0 (kept: it is the base model itself).
    overrides = tiny_run_overrides(
        train, val, tmp_path / "run", **{"eval.guard_path": guard, "merge.alphas": "[1.0,0.5,0.0]"}
    )
    metrics = run(compose_train(overrides))
    guard_report = metrics["merge"]["guard"]
    assert (
        set(guard_report["alphas"]) == {"1.0", "0.5", "0.0"} and guard_report["alphas"]["0.0"] == guard_report["base"]
    )
    logged = (tmp_path / "run" / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "guard/ndcg@10" in logged

    # Every α that loses anything on the guard set is ruled out when no drop is allowed.
    strict_overrides = tiny_run_overrides(
        train,
        val,
        tmp_path / "strict",
        **{"eval.guard_path": guard, "merge.alphas": "[1.0,0.5,0.0]", "merge.max_guard_drop": 0},
    )
    strict = run(compose_train(strict_overrides))
    guard_report = strict["merge"]["guard"]
    for alpha, scores in guard_report["alphas"].items():
        lost = scores["ndcg@10"] < guard_report["base"]["ndcg@10"]
        assert (alpha in guard_report["ruled_out"]) == lost
    assert str(strict["merge"]["chosen"]) not in guard_report["ruled_out"]


def test_a_bad_guard_file_stops_the_run_before_training(tmp_path: Path) -> None:
    train, val = write_toy_data(tmp_path)
    (tmp_path / "guard.jsonl").write_text('{"query": "q"}\n')
    with pytest.raises(LitEmbedError, match="guard.jsonl"):
        run(
            compose_train(
                tiny_run_overrides(train, val, tmp_path / "run", **{"eval.guard_path": tmp_path / "guard.jsonl"})
            )
        )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_metrics_table_with_three_columns() -> None:
    row = {k: 0.5 for k in ("mrr@10", "ndcg@10", "map@100", "recall@10", "accuracy@1", "accuracy@5", "accuracy@10")}
    table = format_metrics_table({"base": row, "finetuned": {**row, "mrr@10": 0.7}, "final": {**row, "mrr@10": 0.6}})
    assert table.splitlines()[1].split() == ["mrr@10", "0.5000", "0.7000", "0.6000", "+0.1000"]


# data.mine
def test_mining_for_training_gives_each_row_a_hard_negative_from_the_corpus(tmp_path: Path, tiny_encoder) -> None:
    from lit_embed.data.datamodule import QAPairDataModule
    from lit_embed.mine import mine_for_training

    train, _ = write_toy_data(tmp_path, num_train=48)
    data = QAPairDataModule(train_path=str(train), batch_size=8, mine=True)
    data.prepare_data()
    assert not any(e.negatives for e in data.rows.examples())
    mine_for_training(data, tiny_encoder, cache_dir=str(tmp_path / "cache"))
    rows = data.rows.examples()
    # The margin drops candidates scored close to the positive (a random tiny model scores many so): some remain.
    assert any(e.negatives for e in rows)
    assert all(len(e.negatives) <= 1 and e.positive not in e.negatives for e in rows)
    corpus = set(data.rows.documents.texts(range(len(data.rows.documents))))
    assert all(n in corpus for e in rows for n in e.negatives)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # queries and documents, reused by the next run
    again = QAPairDataModule(train_path=str(train), batch_size=8, mine=True)
    again.prepare_data()
    mine_for_training(again, tiny_encoder, cache_dir=str(tmp_path / "cache"))
    assert again.rows.examples() == rows


def test_mining_after_a_held_out_slice_mines_only_for_the_queries_trained_on(
    tmp_path: Path, tiny_encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lit_embed.mine
    from lit_embed.data.datamodule import QAPairDataModule

    asked = []
    mine = lit_embed.mine.mine_hard_negatives
    monkeypatch.setattr(
        lit_embed.mine, "mine_hard_negatives", lambda dataset, *a, **k: asked.append(dataset) or mine(dataset, *a, **k)
    )
    train, _ = write_toy_data(tmp_path, num_train=240)
    data = QAPairDataModule(train_path=str(train), batch_size=8, mine=True, val_fraction=0.1)
    data.prepare_data()
    held_out = set(data.val_dataset.queries.values())
    assert len(held_out) == 24
    lit_embed.mine.mine_for_training(data, tiny_encoder, cache_dir=str(tmp_path / "cache"))
    mined = asked[0]
    assert len(mined.queries) == 216 and held_out.isdisjoint(mined.queries.values())
    assert len(mined.corpus) == len(data.rows.documents)  # every document is a candidate negative


def test_a_run_with_data_mine_trains_on_mined_negatives(tmp_path: Path, caplog) -> None:
    caplog.set_level("INFO")
    train, val = write_toy_data(tmp_path, num_train=48)
    metrics = run(compose_train(tiny_run_overrides(train, val, tmp_path / "run", **{"data.mine": "true"})))
    assert metrics["final"]
    assert "hard negatives" in caplog.text.lower()


def test_guard_rule_keeps_alphas_within_the_allowed_drop(caplog) -> None:
    merging = WeightMerging(alphas=[1.0, 0.5, 0.0], metric="ndcg@10", max_guard_drop=0.01)
    guards = {1.0: {"ndcg@10": 0.70}, 0.5: {"ndcg@10": 0.795}, 0.0: {"ndcg@10": 0.80}}
    assert merging._ruled_out(guards, {"ndcg@10": 0.80}) == {1.0}
    assert "α=1.0 ruled out: guard ndcg@10 0.7000" in caplog.text
    assert merging._ruled_out(guards, None) == set()  # no guard set: nothing to rule out


def test_the_largest_alpha_near_the_best_is_chosen_and_never_one_below_the_base() -> None:
    merging = WeightMerging(alphas=[1.0, 0.9, 0.5, 0.0], tolerance=0.005)
    assert merging._pick({1.0: 0.896, 0.9: 0.900, 0.5: 0.899, 0.0: 0.85}, base=0.85) == 1.0  # within noise
    assert merging._pick({1.0: 0.880, 0.9: 0.900, 0.5: 0.899, 0.0: 0.85}, base=0.85) == 0.9
    assert merging._pick({1.0: 0.848, 0.0: 0.85}, base=0.85) == 0.0  # near the base, but below it
    assert WeightMerging(alphas=[1.0, 0.0], tolerance=0)._pick({1.0: 0.849, 0.0: 0.85}, base=0.85) == 0.0
