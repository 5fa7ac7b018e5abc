"""Retrieval sets built from what any Linux machine has, for experiments that must not tune on one split.

    python benchmarks/retrieval_sets.py stdlib runs/data/stdlib --seed 42   # docstring -> function, Python's stdlib
    python benchmarks/retrieval_sets.py man runs/data/man --seed 0          # man page NAME line -> its DESCRIPTION
    python benchmarks/retrieval_sets.py code:sympy runs/data/sympy          # docstring -> function, a package
    python benchmarks/retrieval_sets.py man3 runs/data/perl                 # man section 3 (Perl modules, C)
    python benchmarks/retrieval_sets.py man:intl runs/data/intl             # translated man pages (de, fr, ru...)

Each writes ``train.json`` and ``val.json`` (LlamaIndex's format) into the folder, and ``test.json`` with
``--test N``: 1500 and 300 pairs by default, no query in two of them. A few man pages share one description (3
documents of the man split with seed 0 are in both).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import random
import re
from pathlib import Path

from lit_embed.data.formats import QADataset, save_llamaindex_json
from lit_embed.data.schema import queries_subset
from lit_embed.data.stdlib import build_stdlib_dataset

# The NAME and DESCRIPTION headings of translated man pages (de, fr, es, pt, it, nl, sv, pl, ru, ja, zh).
NAME_HEADINGS = "NAME|BEZEICHNUNG|NOM|NOMBRE|NOME|NAAM|NAMN|NAZWA|НАЗВАНИЕ|ИМЯ|名前|名称|名字"
DESCRIPTION_HEADINGS = (
    "DESCRIPTION|BESCHREIBUNG|DESCRIPCIÓN|DESCRIÇÃO|DESCRIZIONE|BESCHRIJVING|BESKRIVNING|OPIS|ОПИСАНИЕ|説明|描述|简介"
)


def man_page_pairs(directories: list[Path] = [Path("/usr/share/man/man1")]) -> list[tuple[str, str]]:  # noqa: B006
    """(the NAME line's description, the first 150 words of DESCRIPTION) of every man page that has both."""
    pairs: dict[str, str] = {}
    for path in sorted(p for directory in directories for p in directory.glob("*.gz")):
        try:
            source = gzip.open(path, "rt", errors="ignore").read()
        except (OSError, EOFError):
            continue
        name = re.search(rf'^\.SH "?(?:{NAME_HEADINGS})"?\s*\n(.*?)(?=^\.SH)', source, re.M | re.S)
        description = re.search(rf'^\.SH "?(?:{DESCRIPTION_HEADINGS})"?\s*\n(.*?)(?=^\.SH|\Z)', source, re.M | re.S)
        if not name or not description:
            continue
        name_text = _plain(name.group(1))
        if " - " not in name_text:
            continue
        query = name_text.split(" - ", 1)[1].strip()
        document = " ".join(_plain(description.group(1)).split()[:150])
        # Words, or characters for Chinese and Japanese, which have no spaces.
        if max(len(query.split()), len(query) // 4) >= 3 and len(document) >= 100 and query not in pairs:
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
    parser.add_argument("source", help="stdlib, code:PACKAGE (installed), man, man3 or man:intl")
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=42, help="the shuffle that splits train from val")
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--val", type=int, default=300)
    parser.add_argument("--test", type=int, default=0, help="also write test.json with this many pairs")
    args = parser.parse_args()
    held_out = args.val + args.test
    if args.source == "stdlib" or args.source.startswith("code:"):
        root = None
        if args.source.startswith("code:"):
            root = str(Path(importlib.util.find_spec(args.source[5:]).origin).parent)
        train, held = build_stdlib_dataset(seed=args.seed, num_train=args.train, num_val=held_out, stdlib_dir=root)
        held_ids = list(held.queries)
        val, test = queries_subset(held, held_ids[: args.val]), queries_subset(held, held_ids[args.val :])
    else:
        man = Path("/usr/share/man")
        directories = {
            "man": [man / "man1"],
            "man3": [man / "man3"],
            "man:intl": sorted(d / "man1" for d in man.iterdir() if not d.name.startswith("man")),
        }[args.source]
        pairs = man_page_pairs(directories)
        random.Random(args.seed).shuffle(pairs)
        val, test = as_dataset(pairs[: args.val], "v"), as_dataset(pairs[args.val : held_out], "e")
        train = as_dataset(pairs[held_out : held_out + args.train], "t")
    args.out.mkdir(parents=True, exist_ok=True)
    save_llamaindex_json(train, args.out / "train.json")
    save_llamaindex_json(val, args.out / "val.json")
    if args.test:
        save_llamaindex_json(test, args.out / "test.json")
    print(f"{args.out}: {len(train.queries)} training, {len(val.queries)} validation, {len(test.queries)} test pairs")


if __name__ == "__main__":
    main()
