"""lit-embed-score: a teacher's scores in the rows (resumable, atomic), and a margin_mse run trained on them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lit_embed.score import load_teacher, score_file


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> str:
    from lit_embed.models.tiny import build_tiny_cross_encoder

    return build_tiny_cross_encoder(tmp_path_factory.mktemp("teacher") / "cross_encoder")


def rows(n: int) -> list[dict]:
    return [
        {
            "query": f"how do I do task {i}?",
            "positive": f"def task_{i}(): return {i}",
            "negatives": [f"def other_{i}_{j}(): return {j}" for j in range(2)],
            "id": i,
        }
        for i in range(n)
    ]


def write(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_scores_equal_the_cross_encoders_and_resume_after_a_crash(tmp_path: Path, cross_encoder: str) -> None:
    from sentence_transformers import CrossEncoder

    source, out = write(tmp_path / "in.jsonl", rows(5)), tmp_path / "out.jsonl"
    teacher = load_teacher(cross_encoder)
    calls = []

    def crashing(pairs):
        calls.append(len(pairs))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return teacher(pairs)

    with pytest.raises(KeyboardInterrupt):
        score_file(source, out, crashing, batch_size=6)
    assert not out.exists() and len(Path(f"{out}.progress").read_text().splitlines()) == 2
    assert score_file(source, out, teacher, batch_size=6) == 3  # only the rows not scored before
    assert not Path(f"{out}.progress").exists()
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    model = CrossEncoder(cross_encoder, device="cpu")
    for row in scored:
        expected = model.predict([(row["query"], d) for d in (row["positive"], *row["negatives"])])
        assert row["scores"] == pytest.approx(expected.tolist(), abs=1e-5)
    assert [r["id"] for r in scored] == list(range(5))  # other keys are kept


def test_a_bi_encoder_scores_with_its_similarity(tmp_path: Path, tiny_model_path: str) -> None:
    from sentence_transformers import SentenceTransformer

    source, out = write(tmp_path / "in.jsonl", rows(2)), tmp_path / "out.jsonl"
    score_file(source, out, load_teacher(tiny_model_path), batch_size=4)
    row = json.loads(out.read_text().splitlines()[1])
    model = SentenceTransformer(tiny_model_path, device="cpu")
    q, p = model.encode([row["query"], row["positive"]], convert_to_tensor=True)
    assert row["scores"][0] == pytest.approx(model.similarity(q[None], p[None]).item(), abs=1e-5)


def test_a_hugging_face_cross_encoder_folder_is_a_teacher(tmp_path: Path, cross_encoder: str) -> None:
    """A cross-encoder saved by transformers alone (no modules.json) passes the model-folder check and scores."""
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lit_embed.models.model_folder import check_model_folder

    plain = tmp_path / "hf_cross_encoder"
    AutoModelForSequenceClassification.from_pretrained(cross_encoder).save_pretrained(plain)
    AutoTokenizer.from_pretrained(cross_encoder).save_pretrained(plain)
    assert not (plain / "modules.json").exists()
    for folder in (cross_encoder, plain):
        check_model_folder(folder, what="--teacher")
    pair = ("how do I do task 1?", "def task_1(): return 1")
    expected = CrossEncoder(cross_encoder, device="cpu").predict([pair]).tolist()
    assert load_teacher(str(plain))([pair]) == pytest.approx(expected, abs=1e-5)


def test_bad_input_is_one_message_naming_the_line(tmp_path: Path) -> None:
    bad = rows(3)
    bad[1]["negatives"] = "not a list"
    source = write(tmp_path / "in.jsonl", bad)
    done = subprocess.run(
        [sys.executable, "-m", "lit_embed.score", str(source), str(tmp_path / "o.jsonl"), "--teacher", "none"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and f"{source}, line 2" in done.stderr and "Traceback" not in done.stderr


def test_a_scored_file_trains_with_margin_mse_and_exports(tmp_path: Path, cross_encoder: str) -> None:
    from helpers import REPO, tiny_run_overrides

    source, out = write(tmp_path / "in.jsonl", rows(16)), tmp_path / "scored.jsonl"
    score = [sys.executable, "-m", "lit_embed.score", str(source), str(out), "--teacher", cross_encoder]
    subprocess.run(score, check=True, capture_output=True)
    overrides = tiny_run_overrides(out, None, tmp_path / "run", loss="margin_mse", **{"trainer.max_steps": 2})
    subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], check=True, capture_output=True, cwd=tmp_path)
    assert (tmp_path / "run" / "model" / "modules.json").exists()
