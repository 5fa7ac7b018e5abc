"""``lit-embed-score IN.jsonl OUT.jsonl --teacher MODEL``: a teacher's scores for distillation (loss=margin_mse).

Every ``{"query", "positive", "negatives"}`` row gets ``"scores"``: the teacher's score of the positive, then of each
negative, in order. The teacher is any sentence-transformers ``CrossEncoder`` (it reads each (query, document) pair)
or bi-encoder (the model's similarity of the two embeddings).

* Resumable: the scores of each finished batch of rows are appended to ``OUT.jsonl.progress`` at once, so a crash
  or Ctrl-C costs at most one batch and the next run with the same arguments scores only what is left.
* The output is written atomically when every row is scored; the progress file is then removed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lit_embed.console import quiet_third_party_output
from lit_embed.data.json_files import json_lines
from lit_embed.errors import DataFormatError, LitEmbedError, reported
from lit_embed.files import write_text_atomic
from lit_embed.models.model_folder import check_model_folder, loading_errors, read_json

log = logging.getLogger(__name__)

TRUST_FLAG = "pass --trust-remote-code"  # lit-embed-score's and lit-embed-mine's
Scorer = Callable[[list[tuple[str, str]]], list[float]]  # (query, document) pairs -> one score each


def score_file(source: str | Path, out: str | Path, scorer: Scorer, batch_size: int = 32, resume: bool = True) -> int:
    """Writes ``source``'s rows with the teacher's ``"scores"`` to ``out``; returns how many rows were scored now.

    Args:
        source: ``{"query", "positive", "negatives"}`` JSONL; other keys are kept, ``"scores"`` replaced.
        out: the scored JSONL, written once every row is scored.
        scorer: the teacher (see :func:`load_teacher`).
        batch_size: (query, document) pairs per teacher call; progress is saved after each call.
        resume: take the scores already in ``OUT.progress`` (False: start over).
    """
    if batch_size < 1:
        raise LitEmbedError(f"--batch-size={batch_size}: score at least 1 pair at a time.")
    rows = read_rows(Path(source))
    progress = Path(f"{out}.progress")
    done = _read_progress(progress) if resume and progress.exists() else {}
    keys = [_key(row) for row in rows]
    todo = [i for i, key in enumerate(keys) if key not in done]
    log.info("%s: %d rows, %d scored before, %d to score.", source, len(rows), len(rows) - len(todo), len(todo))
    progress.parent.mkdir(parents=True, exist_ok=True)
    with open(progress, "a" if resume else "w", encoding="utf-8") as sink:
        for chunk in _chunks(todo, rows, batch_size):
            pairs = [(rows[i]["query"], text) for i in chunk for text in (rows[i]["positive"], *rows[i]["negatives"])]
            scores = iter(scorer(pairs))
            for i in chunk:
                done[keys[i]] = [float(next(scores)) for _ in range(1 + len(rows[i]["negatives"]))]
                if not all(math.isfinite(s) for s in done[keys[i]]):
                    raise LitEmbedError(f"{source}, line {rows[i]['_line']}: the teacher scored it {done[keys[i]]}.")
                sink.write(json.dumps({"key": keys[i], "scores": done[keys[i]]}) + "\n")
            sink.flush()
    lines = []
    for row, key in zip(rows, keys, strict=True):
        kept = {k: v for k, v in row.items() if k != "_line"}
        lines.append(json.dumps(kept | {"scores": done[key]}, ensure_ascii=False) + "\n")
    write_text_atomic(out, "".join(lines))
    progress.unlink()
    return len(todo)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The file's rows, each checked: a text query and positive and a list of text negatives."""
    rows = []
    for lineno, where, row in json_lines(path):
        texts = isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ("query", "positive"))
        negatives = row.setdefault("negatives", []) if texts else None
        if not texts or not isinstance(negatives, list) or not all(isinstance(t, str) for t in negatives):
            raise DataFormatError(
                f'{where}: each line must be an object with a text "query" and "positive" and a list of text '
                '"negatives" (optional). Fix or remove the line.'
            )
        rows.append(row | {"_line": lineno})
    if not rows:
        raise DataFormatError(f"{path}: no rows to score.")
    return rows


def _key(row: dict[str, Any]) -> str:
    """A row's identity in the progress file: its texts, so an edited input is scored again."""
    texts = json.dumps([row["query"], row["positive"], row["negatives"]], ensure_ascii=False)
    return hashlib.sha256(texts.encode()).hexdigest()


def _chunks(todo: list[int], rows: list[dict[str, Any]], batch_size: int):
    """Groups of whole rows of about ``batch_size`` pairs (a row with more pairs is a group of its own)."""
    chunk: list[int] = []
    pairs = 0
    for i in todo:
        size = 1 + len(rows[i]["negatives"])
        if chunk and pairs + size > batch_size:
            yield chunk
            chunk, pairs = [], 0
        chunk.append(i)
        pairs += size
    if chunk:
        yield chunk


def _read_progress(path: Path) -> dict[str, list[float]]:
    """The scores saved by an earlier run. Lines that are not whole records (a crash mid-write, damage) are scored
    again, with one warning; a torn last line is cut, or the next record would be appended to it and lost too."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    done, damaged = {}, int(end < len(data))
    for line in data[:end].decode("utf-8", errors="replace").split("\n"):
        if not line:
            continue
        try:
            record = json.loads(line)
            done[record["key"]] = [float(s) for s in record["scores"]]
        except (KeyError, TypeError, ValueError):  # JSONDecodeError is a ValueError
            damaged += 1
    if damaged:
        log.warning(
            "%s: %d line(s) not whole records (an interrupted write); their rows are scored again.", path, damaged
        )
    return done


def load_teacher(name: str, kind: str = "auto", batch_size: int = 32, trust_remote_code: bool = False) -> Scorer:
    """A sentence-transformers ``CrossEncoder`` or bi-encoder as a function of (query, document) pairs.

    The folder is checked as every model lit_embed loads (:func:`~lit_embed.models.model_folder.check_model_folder`):
    what is not a model, or would run its own code without ``trust_remote_code``, is one message.

    Args:
        name: a model directory or hub id.
        kind: ``cross-encoder``, ``bi-encoder``, or ``auto``: a directory saved as a ``CrossEncoder`` (or whose
            transformer is a ``...ForSequenceClassification``) is a cross-encoder, any other a bi-encoder.
        batch_size: pairs per forward pass.
        trust_remote_code: let the model run its own code.
    """
    check_model_folder(name, trust_remote_code, what="--teacher", fix=TRUST_FLAG)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "auto":
        kind = "cross-encoder" if is_cross_encoder(name) else "bi-encoder"
    if kind == "cross-encoder":
        from sentence_transformers import CrossEncoder

        with loading_errors(name, TRUST_FLAG):
            model = CrossEncoder(name, device=device, trust_remote_code=trust_remote_code)
        return lambda pairs: model.predict(pairs, batch_size=batch_size, show_progress_bar=False).tolist()
    from sentence_transformers import SentenceTransformer

    with loading_errors(name, TRUST_FLAG):
        encoder = SentenceTransformer(name, device=device, trust_remote_code=trust_remote_code)

    def bi_encoder(pairs: list[tuple[str, str]]) -> list[float]:
        queries = encoder.encode_query([q for q, _ in pairs], batch_size=batch_size, convert_to_tensor=True)
        documents = encoder.encode_document([d for _, d in pairs], batch_size=batch_size, convert_to_tensor=True)
        return encoder.similarity_pairwise(queries, documents).tolist()

    return bi_encoder


def is_cross_encoder(name: str) -> bool:
    """Whether a model directory holds a cross-encoder (False for hub ids: pass ``--teacher-type``)."""
    path = Path(name)
    for file, check in (
        ("config_sentence_transformers.json", lambda c: c.get("model_type") == "CrossEncoder"),
        (
            "config.json",
            lambda c: any(str(a).endswith("ForSequenceClassification") for a in c.get("architectures") or []),
        ),
    ):
        config = read_json(path / file) if (path / file).is_file() else None
        if isinstance(config, dict) and check(config):
            return True
    return False


def main(argv: Sequence[str] | None = None) -> None:
    """``lit-embed-score IN.jsonl OUT.jsonl --teacher MODEL``; exits 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="lit-embed-score",
        description="Add a teacher's scores of each row's positive and negatives, to train with loss=margin_mse or "
        "loss=kl_distill on data=qa_json data.train_path=OUT.jsonl.",
    )
    parser.add_argument("data", help='{"query", "positive", "negatives"} rows (.jsonl)')
    parser.add_argument("out", help='where to write the rows with their "scores" (.jsonl)')
    parser.add_argument("--teacher", required=True, help="sentence-transformers CrossEncoder or bi-encoder")
    parser.add_argument(
        "--teacher-type",
        choices=("auto", "cross-encoder", "bi-encoder"),
        default="auto",
        help="auto (default): a directory saved as a CrossEncoder is one, anything else a bi-encoder",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per teacher call (default 32)")
    parser.add_argument("--restart", action="store_true", help="ignore the saved progress and score every row")
    parser.add_argument("--trust-remote-code", action="store_true", help="let the teacher run its own code")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_third_party_output()
    with reported("lit-embed-score", log):
        if Path(args.out).suffix.lower() != ".jsonl":
            raise LitEmbedError(f"{args.out}: the output must be a .jsonl file.")
        if args.batch_size < 1:
            raise LitEmbedError(f"--batch-size={args.batch_size}: score at least 1 pair at a time.")
        read_rows(Path(args.data))  # a bad file is reported before the teacher is loaded
        scorer = load_teacher(args.teacher, args.teacher_type, args.batch_size, args.trust_remote_code)
        scored = score_file(args.data, args.out, scorer, args.batch_size, resume=not args.restart)
    log.info(
        "Scored %d rows into %s. Train with loss=margin_mse data=qa_json data.train_path=%s", scored, args.out, args.out
    )


if __name__ == "__main__":
    main()
