"""Retrieval sets built from what any Linux machine has, for experiments that must not tune on one split.

    python benchmarks/retrieval_sets.py stdlib runs/data/stdlib --seed 42   # docstring -> function, Python's stdlib
    python benchmarks/retrieval_sets.py man runs/data/man --seed 0          # man page NAME line -> its DESCRIPTION

Each writes ``train.json`` and ``val.json`` (LlamaIndex's format) into the folder: 1500 and 300 pairs by default,
no query in both. A few man pages share one description (3 documents of the man split with seed 0 are in both).
"""

from __future__ import annotations

import argparse
import gzip
import random
import re
from pathlib import Path

from lit_embed.data.formats import QADataset, save_llamaindex_json
from lit_embed.data.stdlib import build_stdlib_dataset


def man_page_pairs(directory: Path = Path("/usr/share/man/man1")) -> list[tuple[str, str]]:
    """(the NAME line's description, the first 150 words of DESCRIPTION) of every man page that has both."""
    pairs: dict[str, str] = {}
    for path in sorted(directory.glob("*.gz")):
        try:
            source = gzip.open(path, "rt", errors="ignore").read()
        except (OSError, EOFError):
            continue
        name = re.search(r'^\.SH "?NAME"?\s*\n(.*?)(?=^\.SH)', source, re.M | re.S)
        description = re.search(r'^\.SH "?DESCRIPTION"?\s*\n(.*?)(?=^\.SH|\Z)', source, re.M | re.S)
        if not name or not description:
            continue
        name_text = _plain(name.group(1))
        if " - " not in name_text:
            continue
        query = name_text.split(" - ", 1)[1].strip()
        document = " ".join(_plain(description.group(1)).split()[:150])
        if len(query.split()) >= 3 and len(document.split()) >= 20 and query not in pairs:
            pairs[query] = document
    return list(pairs.items())


def _plain(roff: str) -> str:
    """Text of a roff fragment: font escapes and requests out, the words of .B/.I lines kept."""
    text = re.sub(r"\\f[BIRP]|\\f\(..|\\&|\\-", lambda m: "-" if m.group() == "\\-" else "", roff)
    text = re.sub(r"\\\(..|\\[e]", "", text)
    lines = [
        line
        for line in text.splitlines()
        if not line.startswith(".") or line.startswith((".B ", ".I ", ".BR ", ".IR "))
    ]
    lines = [re.sub(r"^\.(B|I|BR|IR|RB|BI|IB) ", "", line).replace('"', "") for line in lines]
    return " ".join(" ".join(lines).split())


def as_dataset(pairs: list[tuple[str, str]], prefix: str) -> QADataset:
    queries, corpus, relevant, ids = {}, {}, {}, {}
    for i, (query, document) in enumerate(pairs):
        if document not in ids:
            ids[document] = f"{prefix}d{len(ids)}"
            corpus[ids[document]] = document
        queries[f"{prefix}q{i}"] = query
        relevant[f"{prefix}q{i}"] = [ids[document]]
    return QADataset(queries, corpus, relevant)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", choices=["stdlib", "man"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=42, help="the shuffle that splits train from val")
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--val", type=int, default=300)
    args = parser.parse_args()
    if args.source == "stdlib":
        train, val = build_stdlib_dataset(seed=args.seed, num_train=args.train, num_val=args.val)
    else:
        pairs = man_page_pairs()
        random.Random(args.seed).shuffle(pairs)
        val, train = as_dataset(pairs[: args.val], "v"), as_dataset(pairs[args.val : args.val + args.train], "t")
    args.out.mkdir(parents=True, exist_ok=True)
    save_llamaindex_json(train, args.out / "train.json")
    save_llamaindex_json(val, args.out / "val.json")
    print(f"{args.out}: {len(train.queries)} training and {len(val.queries)} validation pairs")


if __name__ == "__main__":
    main()
