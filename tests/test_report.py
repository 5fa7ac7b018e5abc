"""report.html: a run's page shows metrics.json's numbers, the curves and the queries that moved; escaped, offline."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from helpers import TOPICS, compose_train, tiny_run_overrides, write_toy_data

from lit_embed.data.formats import load_llamaindex_json, save_llamaindex_json
from lit_embed.data.schema import QADataset
from lit_embed.evaluation import METRIC_TABLE_KEYS
from lit_embed.model_card import duration
from lit_embed.train import run
from lit_embed.training.callbacks.ir_eval import IREvaluationCallback, fingerprint
from lit_embed.training.report import (
    QueryChange,
    biggest_changes,
    query_changes,
    read_logged_metrics,
    render_report,
    shorten,
    write_report,
)

SCRIPT = "<script>alert('x')</script>"


class Page(HTMLParser):
    """The parts of a page the tests look at: every tag with its attributes, the text, and the tables' cells."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.tables: list[dict] = []  # {"class": ..., "rows": [[cell text, ...], ...]}
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self.tables.append({"class": dict(attrs).get("class"), "rows": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1]["rows"][-1].append(" ".join(" ".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def table(self, css_class: str) -> list[list[list[str]]]:
        return [t["rows"] for t in self.tables if t["class"] == css_class]


def hard_validation_set(path: Path, n: int = 30) -> Path:
    """Queries a tiny random model ranks badly (no shared numbers with their documents), with markup in them."""
    queries, corpus, relevant = {}, {}, {}
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        queries[f"q{i}"] = f"{SCRIPT} where to {topic}, case {i % 5}?"
        corpus[f"d{i}"] = f"def helper():\n    # <b>{topic}</b> & variant {(i * 3) % 11}\n    return None"
        relevant[f"q{i}"] = [f"d{i}"]
    save_llamaindex_json(QADataset(queries, corpus, relevant), path)
    return path


def assert_offline(page: Page, html: str) -> None:
    """No script, no stylesheet or font fetched, no link or source outside the file."""
    assert not [tag for tag, _ in page.tags if tag in ("script", "link", "iframe", "object", "embed")]
    for _, attrs in page.tags:
        for name in ("src", "href"):
            assert not (attrs.get(name) or "").startswith(("http:", "https:", "//")), attrs
    assert "http://" not in html and "https://" not in html and "@import" not in html


def test_run_writes_the_report(tmp_path: Path) -> None:
    train, _ = write_toy_data(tmp_path)
    val = hard_validation_set(tmp_path / "val.json")
    out = tmp_path / "run"
    run(compose_train(tiny_run_overrides(train, val, out, **{"eval.evaluation_steps": 2})))
    html = (out / "report.html").read_text(encoding="utf-8")
    page = Page(html)
    assert_offline(page, html)
    metrics = json.loads((out / "metrics.json").read_text())

    # The before/after table holds metrics.json's numbers, the headline rows first, then all the others.
    headline, everything = page.table("metrics")
    assert headline[0] == ["metric", "base", "final", "change"]
    shown = {row[0]: row[1:] for row in headline[1:] + everything[1:]}
    assert list(shown)[: len(METRIC_TABLE_KEYS)] == list(METRIC_TABLE_KEYS)
    assert set(shown) == set(metrics["base"])
    for key, (base, final, change) in shown.items():
        assert (base, final) == (f"{metrics['base'][key]:.4f}", f"{metrics['final'][key]:.4f}"), key
        assert change == f"{metrics['final'][key] - metrics['base'][key]:+.4f}"

    # The curves: one inline PNG.
    (image,) = [attrs for tag, attrs in page.tags if tag == "img"]
    assert image["src"].startswith("data:image/png;base64,")
    assert base64.b64decode(image["src"].split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")

    # The queries: as many rows as queries moved (at most 10 each way), from the rankings the run kept.
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    callback = IREvaluationCallback(dataset=load_llamaindex_json(val))
    callback.load_state_dict(next(s for name, s in state.items() if name.startswith("IREvaluationCallback")))
    assert sorted(callback.rankings) == [0, 2, 4] and metrics["final"]["step"] in callback.rankings
    base, final = (callback.rankings_at(step, callback.dataset) for step in (0, metrics["final"]["step"]))
    changes = query_changes(callback.dataset, base, final)
    improved, worse = biggest_changes(changes)
    assert improved, "4 steps at lr 1e-3 move some of these queries"
    tables = page.table("queries")
    assert [len(t) - 1 for t in tables] == [n for n in (len(improved), len(worse)) if n]
    rows = [row for table in tables for row in table[1:]]
    assert [row[0].split(" ", 1)[0] for row in rows] == [c.query_id for c in improved + worse]
    for row, change in zip(rows, improved + worse, strict=True):
        assert row[1] == f"{change.base_rank or '> 100'} → {change.final_rank or '> 100'}"
    # Query and document texts are shown as text, never as markup.
    text = "".join(page.text)
    assert SCRIPT in text and "<b>" in text and "&" in text
    assert "<script" not in html and "<b>" not in html


def test_run_without_validation_writes_curves_only(tmp_path: Path) -> None:
    train, _ = write_toy_data(tmp_path)
    out = tmp_path / "run"
    run(compose_train(tiny_run_overrides(train, None, out)))
    html = (out / "report.html").read_text(encoding="utf-8")
    page = Page(html)
    assert_offline(page, html)
    assert not page.table("metrics") and not page.table("queries")
    assert "No validation set" in "".join(page.text)
    assert [tag for tag, attrs in page.tags if tag == "img" and attrs["src"].startswith("data:image/png")] == ["img"]


def test_merge_table_renders_from_metrics(tmp_path: Path) -> None:
    base = {key: 0.5 for key in METRIC_TABLE_KEYS}
    final = {key: 0.7 for key in METRIC_TABLE_KEYS} | {"step": 10}
    alphas = {"0.25": {k: 0.55 for k in METRIC_TABLE_KEYS}, "1.0": final, "0.5": {k: 0.72 for k in METRIC_TABLE_KEYS}}
    metrics = {"base": base, "final": final, "merge": {"alphas": alphas, "chosen": 0.5}}
    path = write_report(tmp_path, metrics, {"model": f"{SCRIPT}model"})
    html = path.read_text(encoding="utf-8")
    page = Page(html)
    assert_offline(page, html)
    (merge,) = [t["rows"] for t in page.tables if t["class"] == "metrics" and t["rows"][0][0] == "α"]
    assert merge[0] == ["α", *METRIC_TABLE_KEYS]
    assert [row[0] for row in merge[1:]] == ["0.25", "0.5 chosen", "1.0"]  # by α, the chosen one marked
    assert merge[2][1:] == ["0.7200"] * len(METRIC_TABLE_KEYS)
    assert [attrs.get("class") for tag, attrs in page.tags if tag == "tr" and attrs.get("class")] == ["chosen"]
    assert f"{SCRIPT}model" in "".join(page.text) and "<script" not in html
    assert "No curves" in "".join(page.text)  # no logs/ in this folder
    # Without a merge entry there is no merged-models table.
    assert "Merged models" not in render_report("r", {}, {"base": base, "final": final}, None)


def dataset(n: int) -> QADataset:
    queries = {f"q{i}": f"query {i} {SCRIPT}" for i in range(n)}
    corpus = {f"d{i}": f"document {i}\n" * 20 for i in range(n)}
    return QADataset(queries, corpus, {f"q{i}": [f"d{i}"] for i in range(n)})


def test_biggest_changes_order_by_reciprocal_rank() -> None:
    data = dataset(30)
    # Query i: first relevant rank base i % 7 (0: not in the top 100), final (i * 3) % 5; top hit: itself if rank 1.
    base = torch.tensor([[i if i % 7 == 1 else (i + 1) % 30, i % 7] for i in range(30)], dtype=torch.int32)
    final = torch.tensor([[i if i * 3 % 5 == 1 else (i + 2) % 30, i * 3 % 5] for i in range(30)], dtype=torch.int32)
    changes = query_changes(data, base, final)
    assert changes is not None and len(changes) == 30
    gains = {c.query_id: c.gain for c in changes}
    improved, worse = biggest_changes(changes)
    assert len(improved) == len(worse) == 10
    assert [gains[c.query_id] for c in improved] == sorted((g for g in gains.values() if g > 0), reverse=True)[:10]
    assert [gains[c.query_id] for c in worse] == sorted(g for g in gains.values() if g < 0)[:10]
    q = next(c for c in changes if c.query_id == "q7")  # base rank 0 (deeper than 100), final rank 1
    assert (q.base_rank, q.final_rank, q.gain, q.final_top, q.base_top) == (0, 1, 1.0, "d7", "d8")

    page = Page(render_report("r", {}, {"base": {"mrr@10": 0.1}, "final": {"mrr@10": 0.2}}, None, data, changes))
    improved_rows, worse_rows = (table[1:] for table in page.table("queries"))
    row = next(r for r in improved_rows if r[0].startswith("q7 "))
    assert row[1] == "> 100 → 1"
    assert row[2].startswith("not relevant d8") and row[3].startswith("relevant d7")
    assert row[3].endswith("…") and len(row[3]) < 200  # a long document is shortened
    assert SCRIPT in row[0]
    # Rankings of another dataset (a resumed run validating on other data) are not compared.
    assert query_changes(dataset(29), base, final) is None


def test_fewer_rows_on_small_data() -> None:
    changes = [QueryChange("a", 2, 1, "x", "y"), QueryChange("b", 1, 3, "y", "x"), QueryChange("c", 1, 1, "y", "y")]
    improved, worse = biggest_changes(changes)
    assert [c.query_id for c in improved] == ["a"] and [c.query_id for c in worse] == ["b"]


def test_logs_of_a_resumed_run_are_joined(tmp_path: Path) -> None:
    def write(version: int, rows: list[str]) -> None:
        path = tmp_path / "logs" / f"version_{version}" / "metrics.csv"
        path.parent.mkdir(parents=True)
        path.write_text("epoch,step,train/loss,val/mrr@10\n" + "\n".join(rows) + "\n")

    # Killed after step 4, resumed from the checkpoint of step 2: steps 3 and 4 are done (and logged) again.
    write(0, [",0,,0.5", "0,0,3.0,", "0,1,2.9,", ",2,,0.6", "0,2,2.8,", "0,3,2.7,", ",4,,0.65"])
    write(1, ["0,2,2.75,", "0,3,2.6,", ",4,,0.66"])
    write(10, ["0,4,2.5,"])  # versions in number order, not name order
    rows = read_logged_metrics(tmp_path)
    assert [(r["step"], r.get("train/loss"), r.get("val/mrr@10")) for r in rows] == [
        (0, None, 0.5),
        (1, 3.0, None),  # a training row counts the step it took (Lightning logs it under the one before)
        (2, 2.9, None),
        (2, None, 0.6),
        (3, 2.75, None),
        (4, 2.6, None),
        (4, None, 0.66),
        (5, 2.5, None),
    ]


def test_rankings_survive_a_checkpoint_for_their_dataset_only() -> None:
    callback = IREvaluationCallback()
    callback.history = [{"step": 0, "metrics": {"mrr@10": 0.5}}]
    callback.rankings = {0: {"rankings": torch.tensor([[1, 2]], dtype=torch.int32), "dataset": fingerprint(dataset(2))}}
    restored = IREvaluationCallback()
    restored.load_state_dict(callback.state_dict())
    assert restored.history == callback.history
    assert torch.equal(restored.rankings_at(0, dataset(2)), torch.tensor([[1, 2]], dtype=torch.int32))
    # Validating on other data after a resume: the old rankings name other queries and documents.
    assert restored.rankings_at(0, dataset(3)) is None and restored.rankings_at(5, dataset(2)) is None
    older = IREvaluationCallback()
    older.load_state_dict({"history": callback.history})  # a checkpoint written before rankings were kept
    assert older.rankings == {}


@pytest.mark.parametrize("text", ["short", "word " * 200])
def test_shorten_keeps_short_texts(text: str) -> None:
    cut = shorten(text, 100, 3)
    assert cut == text.strip() if len(text) < 100 else (cut.endswith(" …") and len(cut) <= 102)


def test_durations_read_naturally() -> None:
    assert [duration(s) for s in (0.4, 42.4, 221.0, 7500.0)] == ["0 s", "42 s", "3 min 41 s", "2 h 05 min"]


def test_a_resumed_run_reports_both_sessions(tmp_path: Path) -> None:
    train, _ = write_toy_data(tmp_path)
    val = hard_validation_set(tmp_path / "val.json")
    out = tmp_path / "run"
    settings = {"eval.evaluation_steps": 2, "checkpoint.save_steps": 2, "trainer.max_steps": 2}
    run(compose_train(tiny_run_overrides(train, val, out, **settings)))
    settings.update({"trainer.max_steps": 4, "resume": "true", "overwrite": "true"})
    run(compose_train(tiny_run_overrides(train, val, out, **settings)))  # a second session: steps 3 and 4

    assert sorted(p.parent.name for p in out.glob("logs/version_*/metrics.csv")) == ["version_0", "version_1"]
    rows = read_logged_metrics(out)
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "val/mrr@10" in r] == [0, 2, 4]
    # The base model's rankings came through the checkpoint: the queries are compared with the exported model's.
    page = Page((out / "report.html").read_text(encoding="utf-8"))
    assert page.table("queries") and "No per-query rankings" not in "".join(page.text)
    assert json.loads((out / "metrics.json").read_text())["final"]["step"] in (0, 2, 4)
