"""The package's floors: every module imports only from its own floor or the ones below, and nothing imports in a
circle. The floors are the README's layout: foundations, data in, models and losses, evaluation, training around
them, the config layer, the verbs on top."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "lit_embed"
FLOORS = [
    (
        "foundations",
        [
            "lit_embed.errors",
            "lit_embed.files",
            "lit_embed.distributed",
            "lit_embed.batch",
            "lit_embed.console",
            "lit_embed.internals",
        ],
    ),
    ("data", ["lit_embed.data"]),
    ("models and losses", ["lit_embed.models", "lit_embed.losses"]),
    ("evaluation", ["lit_embed.evaluation"]),
    ("training", ["lit_embed.training", "lit_embed.model_card"]),
    ("config", ["lit_embed.config"]),
    (
        "verbs",
        [
            "lit_embed.train",
            "lit_embed.cli",
            "lit_embed.evaluate",
            "lit_embed.export",
            "lit_embed.mine",
            "lit_embed.score",
            "lit_embed.generate",
            "lit_embed.sweeps",
            "lit_embed.llamaindex",
            "lit_embed",
        ],
    ),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> int:
    """The floor of a module: the most specific prefix that a floor names."""
    matches = [
        (len(prefix), level)
        for level, (_, prefixes) in enumerate(FLOORS)
        for prefix in prefixes
        if module == prefix or prefix != "lit_embed" and module.startswith(prefix + ".")
    ]
    assert matches, f"{module} is on no floor: add it to FLOORS and the README's layout"
    return max(matches)[1]


def imports(path: Path) -> set[str]:
    """Every lit_embed module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lit_embed"):
            found.add(node.module)
            # `from lit_embed.models import adapters` imports a module, not a name.
            package = PACKAGE.parent / node.module.replace(".", "/")
            found.update(f"{node.module}.{a.name}" for a in node.names if (package / f"{a.name}.py").is_file())
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lit_embed"))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_every_import_goes_to_the_same_floor_or_below() -> None:
    upward = [
        f"{importer} ({FLOORS[floor(importer)][0]}) imports {imported} ({FLOORS[floor(imported)][0]})"
        for importer, imported_modules in graph().items()
        for imported in imported_modules
        if floor(imported) > floor(importer) and importer != "lit_embed"
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circles() -> None:
    edges = graph()
    # The package's own __init__ re-exports a verb lazily; it is the top, not part of a circle.
    edges = {m: {i for i in imported if i != "lit_embed"} for m, imported in edges.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(module) :] + [module]))
        if module in done:
            return
        for imported in sorted(edges[module]):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(edges):
        visit(module, [])


def test_the_floors_check_finds_an_upward_import() -> None:
    assert floor("lit_embed.data.schema") < floor("lit_embed.training.module") < floor("lit_embed.train")
    assert floor("lit_embed.evaluation") == floor("lit_embed.evaluation.ir")
