"""The offline default dataset: docstring sentences and the code they describe, from the local stdlib.

Each pair is (first sentence of a public function's docstring, that function's source without the docstring),
read with :mod:`ast` from the ``.py`` files of the running interpreter's standard library. Nothing is
downloaded and nothing is cached: the build is deterministic for a given stdlib and takes a few seconds.
"""

from __future__ import annotations

import ast
import logging
import os
import random
import re
import sysconfig
import warnings
from collections import Counter
from dataclasses import dataclass
from importlib.util import decode_source
from pathlib import Path

from lit_embed.data.schema import QADataset
from lit_embed.errors import DataFormatError, check, is_int

logger = logging.getLogger(__name__)

# Tests, GUI code, vendored and installer packages: unlike ordinary library code, or repetitive.
EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages", "tkinter"}
)
MAX_FILE_BYTES = 200_000  # the few bigger files are generated data (e.g. pydoc_data/topics.py), not code
MIN_QUERY_WORDS = 4
MAX_QUERY_WORDS = 40
MIN_BODY_LINES = 2  # non-blank, non-comment lines after the docstring
MAX_DOCUMENT_LINES = 60  # keeps documents cheap to embed
MIN_PAIRS = 50

# A sentence ends at a period followed by whitespace or the end, but not inside "e.g." or "i.e.".
_SENTENCE_END = re.compile(r"(?<!e\.g)(?<!i\.e)\.(?=\s|$)")


@dataclass(frozen=True)
class _Pair:
    name: str  # dotted module path + qualified name, e.g. "json.decoder.JSONDecoder.decode"
    query: str
    document: str


def build_stdlib_dataset(
    seed: int = 0, num_train: int | None = 2000, num_val: int | None = 300, stdlib_dir: str | None = None
) -> tuple[QADataset, QADataset]:
    """Builds (train, val) query/code pairs from the standard library's source.

    The pairs are sorted by name and shuffled with ``random.Random(seed)``; val is a prefix of that order and
    train a suffix (read backwards), so changing one cap never reshuffles the other split unless they meet.

    Args:
        seed: seed of the shuffle that splits the pairs.
        num_train: most training pairs; None = all pairs not in val.
        num_val: most validation pairs; None = all pairs not in train.
        stdlib_dir: directory to read; defaults to the running interpreter's ``sysconfig`` stdlib path.

    Returns:
        (train, val), with ids ``q:<name>`` / ``d:<name>`` and one relevant document per query.

    Raises:
        InvalidValueError: a negative cap, or both caps None.
        DataFormatError: fewer than 50 usable pairs under ``stdlib_dir``.
    """
    check_split_sizes(num_train, num_val)
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    pairs = _collect_pairs(root)
    if len(pairs) < MIN_PAIRS:
        raise DataFormatError(
            f"Only {len(pairs)} usable docstring/code pairs found under stdlib_dir={str(root)!r} "
            f"(need at least {MIN_PAIRS}); this Python install may ship without its .py sources. "
            "Point stdlib_dir at a full standard library, or train on your own data with data=qa_json."
        )
    order = sorted(pairs, key=lambda p: p.name)
    random.Random(seed).shuffle(order)
    if num_val is None:
        train = order[::-1][:num_train]
        val = order[: len(order) - len(train)]
    else:
        val = order[:num_val]
        train = order[::-1][: len(order) - len(val)][:num_train]
    wanted = (num_train or 0) + (num_val or 0)
    if len(train) + len(val) < wanted:
        logger.warning(
            "Asked for %s train + %s val stdlib pairs but only %d exist; using %d train and %d val.",
            num_train,
            num_val,
            len(pairs),
            len(train),
            len(val),
        )
    logger.info("stdlib dataset from %s: %d pairs -> %d train, %d val.", root, len(pairs), len(train), len(val))
    return _to_dataset(train), _to_dataset(val)


def check_split_sizes(num_train: int | None, num_val: int | None) -> None:
    """Raises :class:`InvalidValueError` unless both caps are whole numbers >= 0 or None, not both None."""
    check(
        num_train is not None or num_val is not None,
        "num_train",
        num_train,
        "num_train and num_val cannot both be None; set one, and the other split takes what it leaves",
    )
    for label, cap in (("num_train", num_train), ("num_val", num_val)):
        check(cap is None or is_int(cap) and cap >= 0, label, cap, "a whole number >= 0, or null for all the rest")


def _to_dataset(pairs: list[_Pair]) -> QADataset:
    return QADataset(
        queries={f"q:{p.name}": p.query for p in pairs},
        corpus={f"d:{p.name}": p.document for p in pairs},
        relevant_docs={f"q:{p.name}": [f"d:{p.name}"] for p in pairs},
    )


def _collect_pairs(root: Path) -> list[_Pair]:
    """Parses every eligible file under ``root`` and returns the unambiguous pairs; logs what it skipped."""
    skipped: Counter[str] = Counter()
    candidates: list[_Pair] = []
    for dirpath, dirnames, filenames in os.walk(root):
        kept = []
        for d in sorted(dirnames):
            # Only importable, public packages: this also drops __pycache__, lib-dynload and config-* dirs.
            if d in EXCLUDED_DIRS or d.startswith("_") or not d.isidentifier():
                skipped["excluded or private directories"] += 1
            else:
                kept.append(d)
        dirnames[:] = kept  # os.walk descends only into what is left, in sorted order
        package = Path(dirpath).relative_to(root).parts
        for filename in sorted(filenames):
            stem, ext = os.path.splitext(filename)
            if ext != ".py":
                continue
            if stem != "__init__" and (stem.startswith("_") or not stem.isidentifier()):
                skipped["private or non-module files"] += 1
                continue
            path = Path(dirpath, filename)
            if path.stat().st_size > MAX_FILE_BYTES:
                skipped[f"files over {MAX_FILE_BYTES} bytes"] += 1
                continue
            module = ".".join(package if stem == "__init__" else (*package, stem))
            if not module:  # an __init__.py directly under root names no module
                continue
            try:
                source = decode_source(path.read_bytes())
                with warnings.catch_warnings():  # old escape sequences etc. are not our concern
                    warnings.simplefilter("ignore")
                    tree = ast.parse(source, filename=str(path))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                skipped["files that failed to parse"] += 1
                continue
            candidates.extend(_module_pairs(tree, source.split("\n"), module, skipped))
    pairs = _drop_duplicates(candidates, skipped)
    logger.info(
        "stdlib pairs: %d kept of %d candidates; skipped %s.",
        len(pairs),
        len(candidates),
        ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items())) or "nothing",
    )
    return pairs


def _module_pairs(tree: ast.Module, lines: list[str], module: str, skipped: Counter[str]) -> list[_Pair]:
    """Pairs for the module's top-level functions and the methods of its public (nested) classes."""
    pairs = []
    stack: list[tuple[str, list[ast.stmt]]] = [(module, tree.body)]
    while stack:
        prefix, body = stack.pop()
        for node in body:
            if isinstance(node, ast.ClassDef):
                if node.name.startswith("_"):
                    skipped["private classes"] += 1
                else:
                    stack.append((f"{prefix}.{node.name}", node.body))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.name.startswith("_"):
                    skipped["private or special functions"] += 1
                    continue
                pair, reason = _function_pair(node, lines, f"{prefix}.{node.name}")
                if pair is None:
                    skipped[reason] += 1
                else:
                    pairs.append(pair)
    return pairs


def _function_pair(
    node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str], name: str
) -> tuple[_Pair | None, str]:
    """The function's pair, or None and the reason it is skipped."""
    docstring = ast.get_docstring(node)
    if not docstring:
        return None, "functions without a docstring"
    query = first_sentence(docstring)
    if not MIN_QUERY_WORDS <= len(query.split()) <= MAX_QUERY_WORDS:
        return None, f"docstring first sentences outside {MIN_QUERY_WORDS}-{MAX_QUERY_WORDS} words"
    doc_node, rest = node.body[0], node.body[1:]
    if not rest or all(_is_placeholder(stmt) for stmt in rest):
        return None, "trivial bodies"
    if doc_node.lineno == node.lineno or rest[0].lineno == doc_node.end_lineno:
        # The docstring shares a line with the signature or with code: cutting its lines would cut code too.
        return None, "docstrings sharing a line with code"
    body_lines = lines[doc_node.end_lineno : node.end_lineno]
    if sum(1 for line in body_lines if line.strip() and not line.lstrip().startswith("#")) < MIN_BODY_LINES:
        return None, "trivial bodies"
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    # Start the body at its first non-blank line, so no gap is left where the docstring was.
    first_code = next(i for i, line in enumerate(body_lines) if line.strip())
    kept = lines[start - 1 : doc_node.lineno - 1] + body_lines[first_code:]
    if len(kept) > MAX_DOCUMENT_LINES:
        return None, f"documents over {MAX_DOCUMENT_LINES} lines"
    # Remove the method's own indentation; lines indented less (inside multi-line strings) stay as they are.
    indent = node.col_offset
    document = "\n".join(line[indent:] if not line[:indent].strip() else line for line in kept).rstrip()
    if query in " ".join(document.split()):
        return None, "functions whose code repeats the query"
    return _Pair(name, query, document), ""


def _is_placeholder(stmt: ast.stmt) -> bool:
    """``pass``, ``...`` or ``raise NotImplementedError``: a body that says nothing about the docstring."""
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and stmt.value.value is Ellipsis:
        return True
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def first_sentence(docstring: str) -> str:
    """The first sentence of the docstring's first paragraph, whitespace collapsed, period kept."""
    paragraph = re.split(r"\n\s*\n", docstring.strip(), maxsplit=1)[0]
    text = " ".join(paragraph.split())
    end = _SENTENCE_END.search(text)
    return text[: end.end()] if end else text


def _drop_duplicates(pairs: list[_Pair], skipped: Counter[str]) -> list[_Pair]:
    """Drops every pair whose name, query or document is not unique: a repeated one would be ambiguous."""
    names = Counter(p.name for p in pairs)
    queries = Counter(p.query for p in pairs)
    documents = Counter(p.document for p in pairs)
    kept = []
    for p in pairs:
        if names[p.name] > 1:  # e.g. a function defined twice, or a property and its setter
            skipped["pairs with a repeated name"] += 1
        elif queries[p.query] > 1:
            skipped["pairs with a repeated query"] += 1
        elif documents[p.document] > 1:
            skipped["pairs with a repeated document"] += 1
        else:
            kept.append(p)
    return kept
