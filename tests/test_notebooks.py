"""The notebooks run top to bottom (on a tiny model) and are committed without outputs."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from helpers import REPO
from nbclient import NotebookClient

from lit_embed.evaluation import METRIC_NAMES, METRIC_TABLE_KEYS

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks() -> None:
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_adapter.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs(path: Path) -> None:
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs before committing"


# The adapter notebook runs under -m slow: the quickstart's run is the same job, and the adapter's is tested apart.
@pytest.mark.parametrize(
    "path",
    [p if p.name == "01_quickstart.ipynb" else pytest.param(p, marks=pytest.mark.slow) for p in NOTEBOOKS],
    ids=lambda p: p.name,
)
def test_runs_top_to_bottom(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIT_EMBED_SMOKE", "1")
    monkeypatch.setenv("LIT_EMBED_NOTEBOOK_OUTPUT", str(tmp_path / "run"))
    notebook = nbformat.read(path, as_version=4)
    # One more cell, run in the notebook's kernel after all of its own: what finetune() returned to the notebook.
    notebook.cells.append(nbformat.v4.new_code_cell('import json\nprint("RETURNED", json.dumps(metrics))'))
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "mrr@10" in text
    assert (tmp_path / "run" / "model" / "modules.json").is_file()
    if path.name.startswith("01"):
        assert any("image/png" in o.get("data", {}) for o in outputs), "the training plot is shown"
    else:
        assert "document unchanged: 0.0" in text

    run = tmp_path / "run"
    # The metrics the notebook got back are the run's metrics.json: before and after, every metric in [0, 1].
    returned = json.loads(re.search(r"^RETURNED (.*)$", text, re.M)[1])
    saved = json.loads((run / "metrics.json").read_text())
    assert returned == saved
    # Merging is on: the plain finetuned weights' metrics, and the exported merge's with its alpha.
    assert set(saved) == {"base", "finetuned", "final", "merge"} and set(saved["base"]) == set(METRIC_NAMES)
    assert set(saved["final"]) == {*METRIC_NAMES, "step", "alpha"} and saved["final"]["step"] >= 0
    assert all(0 <= saved[when][name] <= 1 for when in ("base", "final") for name in METRIC_NAMES)
    # ... and so is the table the notebook printed (to its 4 decimals), change column included.
    table = cell_text(notebook, "print(format_metrics_table(metrics))")
    for key in METRIC_TABLE_KEYS:
        base, _, final, change = map(
            float, re.search(rf"^{re.escape(key)}\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$", table, re.M).groups()
        )
        assert base == pytest.approx(saved["base"][key], abs=5.1e-5) and 0 <= base <= 1
        assert final == pytest.approx(saved["final"][key], abs=5.1e-5) and 0 <= final <= 1
        assert change == pytest.approx(saved["final"][key] - saved["base"][key], abs=5.1e-5)

    # The model directory it saved loads in plain sentence-transformers and embeds.
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(run / "model"), device="cpu")
    queries = ["Return the number of items in a container."]
    documents = ["def count(self):\n    return len(self._items)", "def close(self):\n    self._file.close()"]
    q, d = model.encode_query(queries, convert_to_tensor=True), model.encode_document(documents, convert_to_tensor=True)
    assert q.shape == (1, 64) and d.shape == (2, 64)
    assert torch.isfinite(q).all() and torch.isfinite(d).all() and not torch.equal(d[0], d[1])
    torch.testing.assert_close(d.norm(dim=1), torch.ones(2), atol=1e-4, rtol=0)  # the tiny model normalizes
    if path.name.startswith("01"):
        torch.testing.assert_close(q.norm(dim=1), torch.ones(1), atol=1e-4, rtol=0)  # (the adapter's head does not)
        # The similarities the notebook printed are this model's.
        printed = cell_text(notebook, "print(model.similarity(queries, documents))")
        values = [float(v) for v in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", printed)]
        np.testing.assert_allclose(values, model.similarity(q, d).flatten().tolist(), atol=1e-4)
        # The plot shown is the run's training.png.
        (shown,) = [o["data"]["image/png"] for o in outputs if "image/png" in o.get("data", {})]
        assert base64.b64decode(shown) == (run / "training.png").read_bytes()
    else:
        # Queries pass the trained head (the LlamaIndex file's weight) over the base model; documents do not.
        base = SentenceTransformer(str(run / "base_model"), device="cpu")
        weight = torch.load(run / "llamaindex_adapter" / "pytorch_model.bin", weights_only=True)["linear.weight"]
        base_q = base.encode_query(queries, convert_to_tensor=True)
        torch.testing.assert_close(q, base_q @ weight.T, atol=1e-5, rtol=0)
        torch.testing.assert_close(d, base.encode_document(documents, convert_to_tensor=True), atol=1e-6, rtol=0)
        moved = float(re.search(r"query moved by: (\S+)", text)[1])
        assert moved > 0 and moved == pytest.approx(float((q - base_q).abs().max()), rel=1e-3, abs=1e-6)
        assert "['config.json', 'pytorch_model.bin']" in text


def cell_text(notebook, source: str) -> str:
    """The printed output of the one code cell whose source contains ``source``."""
    (cell,) = [c for c in notebook.cells if c.cell_type == "code" and source in c.source]
    return "".join(o.get("text", "") for o in cell.outputs)
