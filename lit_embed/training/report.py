"""``report.html``: a finished run at a glance, for a person rather than a program.

One static file that opens in any browser, offline: inline CSS, the curves as an inline PNG, no script and no
link to anything outside it. It shows the before/after metrics (``metrics.json``'s, so the exported model's), the
merged-model table when ``metrics.json`` has a ``"merge"`` entry, the loss (logged and smoothed), learning rate
and validation metrics over steps from ``logs/version_*/metrics.csv`` (a resumed run's versions joined), and the
validation queries whose first relevant document moved up or down the most between the base and the exported
model, with each model's top hit.

A run without validation data gets the header and the curves only: there is nothing to compare.

Query and document texts are the user's data: everything that comes from the data or the config goes through
:func:`html.escape`, and the texts are shortened so one long document does not take over the page.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
from torch import Tensor

from lit_embed.data.schema import QADataset
from lit_embed.evaluation import DEFAULT_K, METRIC_NAMES, METRIC_TABLE_KEYS
from lit_embed.files import write_text_atomic
from lit_embed.model_card import duration
from lit_embed.training.callbacks.ir_eval import IREvaluationCallback
from lit_embed.training.callbacks.progress import draw_loss, draw_validation, pyplot

REPORT_NAME = "report.html"
# Ranks are known down to the deepest cut-off the evaluation computes (MAP@100): deeper is "> 100".
RANK_DEPTH = max(k for ks in DEFAULT_K.values() for k in ks)
QUERIES_SHOWN = 10
QUERY_CHARS = 300
DOCUMENT_CHARS = 320
DOCUMENT_LINES = 7


@dataclass(frozen=True)
class QueryChange:
    """One validation query's ranking before (base model) and after (exported model) training."""

    query_id: str
    base_rank: int  # of the first relevant document, from 1; 0 = not in the top RANK_DEPTH
    final_rank: int
    base_top: str  # the top hit's corpus id
    final_top: str

    @property
    def gain(self) -> float:
        """The change in reciprocal rank of the first relevant document (what MRR averages)."""
        return _reciprocal(self.final_rank) - _reciprocal(self.base_rank)


def _reciprocal(rank: int) -> float:
    return 1.0 / rank if rank > 0 else 0.0


def query_changes(dataset: QADataset, base: Tensor, final: Tensor) -> list[QueryChange] | None:
    """Every validation query's change, from two evaluations' rankings (``[Q, 2]``: top hit, first relevant rank).

    None when the rankings are not of this dataset (a resumed run validating on other data than before).
    """
    query_ids, corpus_ids = list(dataset.queries), list(dataset.corpus)
    for rankings in (base, final):
        if rankings.shape != (len(query_ids), 2) or any(top >= len(corpus_ids) for top in rankings[:, 0].tolist()):
            return None
    changes = []
    for query_id, (base_top, base_rank), (final_top, final_rank) in zip(
        query_ids, base.tolist(), final.tolist(), strict=True
    ):
        if base_top < 0 or final_top < 0:  # a query without relevant documents is not scored
            continue
        changes.append(QueryChange(query_id, base_rank, final_rank, corpus_ids[base_top], corpus_ids[final_top]))
    return changes


def biggest_changes(changes: Sequence[QueryChange], n: int = QUERIES_SHOWN) -> tuple[list, list]:
    """The ``n`` queries that improved most and the ``n`` that got worse most (ties in the dataset's order)."""
    improved = sorted((c for c in changes if c.gain > 0), key=lambda c: -c.gain)
    worse = sorted((c for c in changes if c.gain < 0), key=lambda c: c.gain)
    return improved[:n], worse[:n]


def read_logged_metrics(output_dir: Path) -> list[dict[str, float]]:
    """The rows of every ``logs/version_*/metrics.csv``, joined in version order, as ``{"step": s, name: value}``.

    A resumed run logs into the next version from its checkpoint's step on; rows of an earlier version at or after
    that step were logged by steps the interrupted run redid, so the later version's rows replace them. Training
    rows are moved one step on: Lightning logs a step's loss under the number of steps done before it, evaluations
    under the number done after, which is what the plots and ``metrics.json`` count.
    """
    versions = sorted(
        (int(m.group(1)), path)
        for path in (output_dir / "logs").glob("version_*/metrics.csv")
        if (m := re.fullmatch(r"version_(\d+)", path.parent.name))
    )
    joined: list[dict[str, float]] = []
    for _, path in versions:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [_parsed_row(row) for row in csv.DictReader(f)]
        rows = [row for row in rows if row is not None]
        if rows:
            start = min(row["step"] for row in rows)
            joined = [row for row in joined if row["step"] < start] + rows
    return joined


def _parsed_row(row: dict[str, str]) -> dict[str, float] | None:
    values = {}
    for key, text in row.items():
        if key in ("epoch", "step") or not text:
            continue
        try:
            values[key] = float(text)
        except ValueError:
            continue
    if not row.get("step") or not values:
        return None
    training = any(key.startswith("train/") for key in values)
    return {"step": int(float(row["step"])) + (1 if training else 0), **values}


def curves(rows: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """``loss`` and ``lr`` as ``[(step, value)]`` and ``history`` as the evaluation callback keeps it."""
    loss = [(int(r["step"]), r["train/loss"]) for r in rows if math.isfinite(r.get("train/loss", math.nan))]
    lr = [(int(r["step"]), r["train/lr"]) for r in rows if "train/lr" in r]
    history = [
        {"step": int(r["step"]), "metrics": {name: r[f"val/{name}"] for name in METRIC_NAMES if f"val/{name}" in r}}
        for r in rows
        if "val/mrr@10" in r and "val/ndcg@10" in r
    ]
    return {"loss": sorted(loss), "lr": sorted(lr), "history": sorted(history, key=lambda h: h["step"])}


def smoothing_for(points: int) -> float:
    """EMA weight for a curve of ``points`` values: about a tenth of the curve, between 0.6 and 0.98."""
    return min(0.98, max(0.6, 1 - 10 / max(points, 1)))


def curves_png(curve: Mapping[str, Any]) -> bytes | None:
    """The loss (logged and smoothed), learning rate and validation metrics side by side, as PNG bytes."""
    panels = [name for name in ("loss", "lr", "history") if curve[name]]
    if not panels:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        if name == "loss":
            draw_loss(ax, curve["loss"], smoothing_for(len(curve["loss"])))
        elif name == "lr":
            steps, values = zip(*curve["lr"], strict=True)
            ax.plot(steps, values, color="tab:gray", linewidth=1.5)
            ax.set(title="learning rate", xlabel="optimizer step", ylabel="train/lr")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            ax.grid(alpha=0.3)
        else:
            draw_validation(ax, curve["history"], ("mrr@10", "ndcg@10"))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150)
    plt.close(fig)
    return buffer.getvalue()


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def shorten(text: str, chars: int, lines: int | None = None) -> str:
    """``text`` cut to ``chars`` characters (and ``lines`` lines) at a word boundary where one is near, with an
    ellipsis when anything was cut."""
    cut = text.strip()
    if lines is not None:
        cut = "\n".join(cut.splitlines()[:lines])
    if len(cut) > chars:
        cut = cut[:chars]
        space = cut.rfind(" ")
        cut = cut[:space] if space > chars * 0.8 else cut
    return cut if cut == text.strip() else cut.rstrip() + " …"


def _rank(rank: int) -> str:
    return str(rank) if rank > 0 else f"&gt;&nbsp;{RANK_DEPTH}"


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else _e(value)


def _change(before: Any, after: Any) -> str:
    if not isinstance(before, int | float) or not isinstance(after, int | float):
        return "<td></td>"
    change = after - before
    kind = "up" if change > 0 else "down" if change < 0 else "same"
    return f'<td class="num {kind}">{change:+.4f}</td>'


def metrics_section(metrics: Mapping[str, Any]) -> str:
    """The before/after table: the headline metrics, then the rest folded away."""
    base, final = metrics["base"], metrics["final"]
    headline = [key for key in METRIC_TABLE_KEYS if key in final]
    rest = [key for key in METRIC_NAMES if key in final and key not in headline]

    def rows(keys: Sequence[str]) -> str:
        return "".join(
            f'<tr><th scope="row">{_e(key)}</th><td class="num">{_number(base.get(key))}</td>'
            f'<td class="num">{_number(final[key])}</td>{_change(base.get(key), final[key])}</tr>'
            for key in keys
        )

    head = "<tr>" + "".join(f'<th scope="col">{name}</th>' for name in ("metric", "base", "final", "change")) + "</tr>"
    cards = "".join(
        f'<div class="card"><div class="label">{_e(key)}</div><div class="big">{_number(base.get(key))} → '
        f'{_number(final[key])}</div><div class="{"up" if final[key] >= base.get(key, 0) else "down"}">'
        f"{final[key] - base.get(key, 0):+.4f}</div></div>"
        for key in headline[:2]
    )
    step = final.get("step")
    exported = f" The exported model is step {_e(step)}'s." if step is not None else ""
    return (
        "<section><h2>Before and after</h2>"
        f'<p class="note">Retrieval on the validation set by the base model and the exported model, as in '
        f"<code>metrics.json</code>.{exported}</p>"
        f'<div class="side"><table class="metrics"><thead>{head}</thead><tbody>{rows(headline)}</tbody></table>'
        f'<div class="cards">{cards}</div></div>'
        + (
            f'<details><summary>all {len(headline) + len(rest)} metrics</summary><table class="metrics">'
            f"<thead>{head}</thead><tbody>{rows(rest)}</tbody></table></details>"
            if rest
            else ""
        )
        + "</section>"
    )


def merge_section(merge: Mapping[str, Any]) -> str:
    """The merged models' table (``{"alphas": {alpha: metrics}, "chosen": alpha}``), the chosen one marked."""
    alphas = merge.get("alphas") or {}

    def order(alpha: str) -> tuple[int, float | str]:
        try:
            return (0, float(alpha))
        except ValueError:
            return (1, alpha)

    chosen = merge.get("chosen")
    keys = [key for key in METRIC_TABLE_KEYS if any(key in m for m in alphas.values())]
    head = "".join(f'<th scope="col">{_e(k)}</th>' for k in keys)
    body = ""
    for alpha in sorted(alphas, key=lambda a: order(str(a))):
        picked = chosen is not None and order(str(alpha)) == order(str(chosen))
        cells = "".join(f'<td class="num">{_number(alphas[alpha].get(k, ""))}</td>' for k in keys)
        mark = ' <span class="tag good">chosen</span>' if picked else ""
        body += f'<tr{" class=chosen" if picked else ""}><th scope="row">{_e(alpha)}{mark}</th>{cells}</tr>'
    return (
        "<section><h2>Merged models</h2>"
        '<p class="note">The merged model of each α on the validation set, as <code>metrics.json</code>\'s '
        '<code>"merge"</code> lists them; the chosen α is marked.</p>'
        f'<table class="metrics"><thead><tr><th scope="col">α</th>{head}</tr></thead><tbody>{body}</tbody></table>'
        "</section>"
    )


def curves_section(curve: Mapping[str, Any] | None) -> str:
    """The curves' figure, or why there is none (``curve`` None: no metrics.csv)."""
    png = curves_png(curve) if curve is not None else None
    if curve is None or png is None:
        why = "no <code>logs/version_*/metrics.csv</code> (logger=csv writes it)" if curve is None else "nothing logged"
        return f'<section><h2>Training</h2><p class="note">No curves: {why}.</p></section>'
    shown = ["the loss as logged (faint) and smoothed"] + ["the learning rate"] * bool(curve["lr"])
    shown += ["the validation metrics at each evaluation (dashed: the base model)"] * bool(curve["history"])
    panels = sum(bool(curve[name]) for name in ("loss", "lr", "history"))
    data = base64.b64encode(png).decode("ascii")
    return (
        "<section><h2>Training</h2>"
        f'<p class="note">From <code>logs/version_*/metrics.csv</code>: {"; ".join(shown)}.</p>'
        # Each panel is drawn for about 380 pixels: one or two panels are not blown up to the page's width.
        f'<img class="curves" style="max-width: {380 * panels}px" alt="training loss, learning rate and validation '
        f'metrics over steps" src="data:image/png;base64,{data}"></section>'
    )


def _hit(dataset: QADataset, query_id: str, doc_id: str) -> str:
    relevant = doc_id in set(dataset.relevant_docs.get(query_id, ()))
    tag = '<span class="tag good">relevant</span>' if relevant else '<span class="tag bad">not relevant</span>'
    text = shorten(dataset.corpus[doc_id], DOCUMENT_CHARS, DOCUMENT_LINES)
    return f'<td class="hit">{tag} <span class="id">{_e(doc_id)}</span><pre>{_e(text)}</pre></td>'


def _relevant(dataset: QADataset, query_id: str) -> str:
    """The query's relevant documents, folded: what a reader compares the top hits with."""
    docs = list(dict.fromkeys(dataset.relevant_docs.get(query_id, ())))
    shown = "".join(
        f'<span class="id">{_e(d)}</span><pre>{_e(shorten(dataset.corpus[d], DOCUMENT_CHARS, DOCUMENT_LINES))}</pre>'
        for d in docs[:3]
        if d in dataset.corpus
    )
    more = f'<span class="id">and {len(docs) - 3} more</span>' if len(docs) > 3 else ""
    label = "relevant document" if len(docs) == 1 else f"{len(docs)} relevant documents"
    return f"<details><summary>{label}</summary>{shown}{more}</details>"


def queries_table(dataset: QADataset, changes: Sequence[QueryChange], title: str, empty: str) -> str:
    if not changes:
        return f'<h3>{_e(title)}</h3><p class="note">{_e(empty)}</p>'
    rows = "".join(
        f'<tr><td class="query"><span class="id">{_e(c.query_id)}</span>'
        f"<div>{_e(shorten(dataset.queries[c.query_id], QUERY_CHARS))}</div>{_relevant(dataset, c.query_id)}</td>"
        f'<td class="rank {"up" if c.gain > 0 else "down"}">{_rank(c.base_rank)} → {_rank(c.final_rank)}</td>'
        f"{_hit(dataset, c.query_id, c.base_top)}{_hit(dataset, c.query_id, c.final_top)}</tr>"
        for c in changes
    )
    head = (
        '<tr><th scope="col">query</th><th scope="col">rank before → after</th>'
        '<th scope="col">top hit before (base)</th><th scope="col">top hit after (exported)</th></tr>'
    )
    return f'<h3>{_e(title)}</h3><table class="queries"><thead>{head}</thead><tbody>{rows}</tbody></table>'


def queries_section(dataset: QADataset, changes: Sequence[QueryChange] | None) -> str:
    if changes is None:
        return (
            '<section><h2>Queries</h2><p class="note">No per-query rankings of both models (a run resumed from a '
            "checkpoint written before they were kept, or validated on other data since).</p></section>"
        )
    improved, worse = biggest_changes(changes)
    up = sum(c.final_rank and (not c.base_rank or c.final_rank < c.base_rank) for c in changes)
    down = sum(c.base_rank and (not c.final_rank or c.final_rank > c.base_rank) for c in changes)
    return (
        "<section><h2>Queries</h2>"
        f'<p class="note">Of {len(changes)} validation queries, the first relevant document moved up for {up}, down '
        f"for {down} and stayed for {len(changes) - up - down}. Ordered by the change in its reciprocal rank "
        f"(what MRR averages). A rank is the first relevant document's place in the ranking, counted to "
        f"{RANK_DEPTH}.</p>"
        + queries_table(dataset, improved, f"Improved most ({len(improved)})", "No query improved.")
        + queries_table(dataset, worse, f"Got worse most ({len(worse)})", "No query got worse.")
        + "</section>"
    )


def skipped_note(skipped: Mapping[str, Any]) -> str:
    """metrics.json's ``skipped``, as the warning words it: problems in wrong records of all records, apart."""
    parts = []
    for path, info in skipped.items():
        problems = info.get("problems", "?")
        parts.append(
            f"{_e(problems)} problem{'' if problems == 1 else 's'} in {_e(info.get('wrong_records', '?'))} of "
            f"{_e(info.get('records', '?'))} records of <code>{_e(path)}</code>"
        )
    return f'<p class="note warn">Left out as wrong on their own: {"; ".join(parts)} (see metrics.json).</p>'


STYLE = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d1d9e0; --soft: #f6f8fa; --good: #1a7f37; --bad: #cf222e; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: var(--ink);
       background: #fff; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 32px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; word-break: break-all; }
h2 { font-size: 20px; margin: 36px 0 8px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 8px; }
.sub, .note { color: var(--muted); margin: 4px 0 12px; }
.warn { color: #9a6700; }
code, pre, .id { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 4px 18px; margin: 16px 0 0;
           padding: 14px 18px; background: var(--soft); border: 1px solid var(--line); border-radius: 8px; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; word-break: break-all; }
.side { display: flex; gap: 32px; align-items: flex-start; flex-wrap: wrap; }
.cards { display: flex; flex-direction: column; gap: 14px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 18px; min-width: 240px; }
.card .label { color: var(--muted); font-size: 13px; }
.card .big { font-size: 22px; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid var(--line); padding: 6px 12px; text-align: left; vertical-align: top; }
thead th { background: var(--soft); font-weight: 600; font-size: 13px; }
table.metrics td.num { text-align: right; font-variant-numeric: tabular-nums; font-family: ui-monospace, monospace; }
table.metrics { min-width: 420px; }
tr.chosen { background: #dafbe1; }
.up { color: var(--good); }
.down { color: var(--bad); }
.same { color: var(--muted); }
details { margin: 10px 0; }
summary { cursor: pointer; color: var(--muted); }
img.curves { width: 100%; height: auto; border: 1px solid var(--line); border-radius: 8px; }
table.queries { width: 100%; table-layout: fixed; font-size: 14px; }
table.queries th:nth-child(1) { width: 25%; }
td.query details pre { font-size: 12px; }
table.queries th:nth-child(2) { width: 9%; }
table.queries th:nth-child(3), table.queries th:nth-child(4) { width: 33%; }
table.queries tbody tr:nth-child(even) { background: #fbfcfd; }
td.query div { overflow-wrap: anywhere; }
td.rank { font-variant-numeric: tabular-nums; white-space: nowrap; font-weight: 600; }
td.hit pre { margin: 6px 0 0; padding: 6px 8px; background: var(--soft); border-radius: 6px; white-space: pre-wrap;
             overflow-wrap: anywhere; }
.id { color: var(--muted); display: block; overflow-wrap: anywhere; }
td.hit .id { display: inline; }
.tag { display: inline-block; font-size: 12px; padding: 0 7px; border-radius: 10px; font-weight: 600; }
.tag.good { background: #dafbe1; color: var(--good); }
.tag.bad { background: #ffebe9; color: var(--bad); }
footer { margin-top: 40px; color: var(--muted); font-size: 13px; }
"""


def render_report(
    title: str,
    facts: Mapping[str, Any],
    metrics: Mapping[str, Any],
    curve: Mapping[str, Any] | None,
    dataset: QADataset | None = None,
    changes: Sequence[QueryChange] | None = None,
) -> str:
    """The whole page as a string. ``curve`` is :func:`curves`' result (None: no metrics.csv)."""
    fact_list = "".join(f"<dt>{_e(key)}</dt><dd>{_e(value)}</dd>" for key, value in facts.items() if value is not None)
    compared = isinstance(metrics.get("base"), dict) and isinstance(metrics.get("final"), dict)
    parts = [
        f'<header><h1>{_e(title)}</h1><p class="sub">lit_embed finetuning run</p>'
        f'<dl class="facts">{fact_list}</dl></header>'
    ]
    if metrics.get("skipped"):
        parts.append(skipped_note(metrics["skipped"]))
    if compared:
        parts.append(metrics_section(metrics))
    else:
        parts.append(
            '<section><h2>Before and after</h2><p class="note">No validation set, so nothing to compare: '
            "only the training curves below.</p></section>"
        )
    if metrics.get("merge"):
        parts.append(merge_section(metrics["merge"]))
    parts.append(curves_section(curve))
    if compared and dataset is not None:
        parts.append(queries_section(dataset, changes))
    parts.append(f"<footer>Written {_e(datetime.now().strftime('%Y-%m-%d %H:%M'))} by lit_embed.</footer>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}: lit_embed report</title><style>{STYLE}</style></head>"
        f"<body><main>{''.join(parts)}</main></body></html>\n"
    )


def write_report(
    output_dir: str | Path,
    metrics: Mapping[str, Any],
    facts: Mapping[str, Any] | None = None,
    dataset: QADataset | None = None,
    base_rankings: Tensor | None = None,
    final_rankings: Tensor | None = None,
) -> Path:
    """Writes ``output_dir/report.html`` (atomically) and returns its path.

    Args:
        output_dir: the run's folder; its ``logs/version_*/metrics.csv`` give the curves.
        metrics: ``metrics.json``'s content (``base``, ``final``, optionally ``merge`` and ``skipped``).
        facts: the header's lines, label -> value (None values are left out).
        dataset: the validation set, for the queries' texts (None: no query tables).
        base_rankings: the base model's per-query rankings (``IREvaluationCallback.rankings_at(0, dataset)``).
        final_rankings: the exported model's.
    """
    output_dir = Path(output_dir)
    logged = any((output_dir / "logs").glob("version_*/metrics.csv"))
    curve = curves(read_logged_metrics(output_dir)) if logged else None
    changes = None
    if dataset is not None and base_rankings is not None and final_rankings is not None:
        changes = query_changes(dataset, base_rankings, final_rankings)
    page = render_report(output_dir.resolve().name, facts or {}, metrics, curve, dataset, changes)
    path = output_dir / REPORT_NAME
    write_text_atomic(path, page)
    return path


METHOD_NAMES = {
    "full": "full finetuning",
    "lora": "LoRA (merged into model/)",
    "adapter": "adapter on the frozen encoder",
}


def header(facts: Mapping[str, Any], output_dir: Path, dataset: QADataset | None) -> dict[str, Any]:
    """The report's header lines, from the run's facts (:func:`lit_embed.model_card.run_facts`, the card's too)."""
    pairs, steps, seconds = facts.get("training_pairs"), facts.get("steps"), facts.get("wall_time_s")
    return {
        "folder": str(output_dir.resolve()),
        "model": facts.get("base_model"),
        "method": METHOD_NAMES.get(facts.get("method"), facts.get("method")),
        "training data": f"{pairs:,} pairs" if isinstance(pairs, int) else None,
        "validation": f"{len(dataset.queries):,} queries, {len(dataset.corpus):,} documents" if dataset else "none",
        "steps": f"{steps:,} optimizer steps; the exported model is step {facts.get('step')}'s" if steps else None,
        "wall time": duration(seconds) if seconds else None,
    }


def write_run_report(
    trainer: L.Trainer,
    evaluation: IREvaluationCallback | None,
    step: int,
    metrics: Mapping[str, Any],
    output_dir: Path,
    facts: Mapping[str, Any],
) -> Path:
    """:func:`write_report` for a run that just finished, its exported model being ``step``'s weights; ``facts``:
    the run's, as the model card has them."""
    dataset = evaluation.validation_set(trainer) if evaluation is not None else None
    base = final = None
    if evaluation is not None and dataset is not None:
        base, final = evaluation.rankings_at(0, dataset), evaluation.rankings_at(step, dataset)
    return write_report(output_dir, metrics, header(facts, output_dir, dataset), dataset, base, final)
