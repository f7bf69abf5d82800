"""Layers that hold: a package of medseg imports only packages below it (docs: ../shared/DESIGN.md, issue 20).

Every ``import medseg.X`` / ``from medseg.X import``, at module level or inside a function (a lazy import is
still a dependency), and ``importlib.import_module("medseg.X")`` with a literal name, is checked. Only
``medseg/__init__.py``'s function bodies and ``if TYPE_CHECKING:`` blocks are skipped: its module ``__getattr__``
may hand out anything lazily, and the type-checking imports name what it hands out.
"""

from __future__ import annotations

import ast
from pathlib import Path

ORDER = [
    "errors",
    "io",
    "preprocessing",
    "data",
    "models",
    "planning",
    "metrics",
    "inference",
    "engine",
    "evaluation",
    "server",
    "cli",
]
RANK = {name: rank for rank, name in enumerate(ORDER)}
BOTTOM = {"", "__init__", "errors", "runtime"}  # `medseg` itself, errors and runtime: importable by all
ENTRY_POINTS = {"__main__"}  # `python -m medseg`, imported by nobody: it may import any layer (it runs the CLI)
SOURCE = Path(__file__).parents[1] / "src" / "medseg"


def layer(parts: list[str]) -> str:
    """The layer of a module below ``medseg``, from its dotted parts after ``medseg`` (``[]``: medseg itself)."""
    return parts[0].removesuffix(".py") if parts else ""


def imported_modules(tree: ast.Module, relative: Path, skip_lazy: bool) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every medseg module ``tree`` (the text of ``medseg/<relative>``) imports,
    relative imports resolved; ``from medseg import X`` counts as importing ``medseg.X`` where X is a layer
    (else it is a name from ``medseg/__init__.py``). ``skip_lazy``: function bodies and ``if TYPE_CHECKING:``
    blocks are left out."""
    package = ["medseg", *relative.parts[:-1]]
    skipped: set[int] = set()
    if skip_lazy:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                skipped.update(id(inner) for inner in ast.walk(node))
            elif isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
                skipped.update(id(inner) for statement in node.body for inner in ast.walk(statement))
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            if module == "medseg":
                found += [(node.lineno, f"medseg.{a.name}" if a.name in RANK else "medseg") for a in node.names]
            else:
                found.append((node.lineno, module))
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "import_module"):
            literal = node.args[0] if node.args else None
            if isinstance(literal, ast.Constant) and isinstance(literal.value, str):
                found.append((node.lineno, literal.value))
    return [(line, name) for line, name in found if name == "medseg" or name.startswith("medseg.")]


def violations(source: str, relative: Path) -> list[str]:
    """``medseg/<file>:<line>: imports medseg.X (...)`` for each import in ``source`` (the text of
    ``medseg/<relative>``) of a layer not below the file's own; none for an entry point."""
    own = layer(list(relative.parts))
    if own in ENTRY_POINTS:
        return []
    if own not in BOTTOM and own not in RANK:
        return [f"medseg/{relative}: {own} has no place in the layers: add it to ORDER in tests/test_layers.py"]
    own_rank = -1 if own in BOTTOM else RANK[own]
    tree = ast.parse(source, filename=str(relative))
    found = []
    for line, name in imported_modules(tree, relative, skip_lazy=relative == Path("__init__.py")):
        target = layer(name.split(".")[1:])
        if target in BOTTOM or target == own:
            continue
        if target not in RANK:
            found.append(f"medseg/{relative}:{line}: imports {name} ({target} has no place in the layers)")
        elif RANK[target] > own_rank:
            found.append(f"medseg/{relative}:{line}: imports {name} ({target} is not below {own or 'medseg'})")
    return found


def test_every_package_imports_only_packages_below_it() -> None:
    files = sorted(SOURCE.rglob("*.py"))
    assert len(files) > 50
    found = [v for path in files for v in violations(path.read_text(), path.relative_to(SOURCE))]
    assert not found, "imports across the layers (" + " < ".join(ORDER) + "):\n" + "\n".join(found)


def test_checker_reports_an_import_from_above() -> None:
    source = "import numpy\nfrom medseg.errors import MedsegError\n\n\ndef f():\n    import medseg.cli.main\n"
    assert violations(source, Path("io/x.py")) == ["medseg/io/x.py:6: imports medseg.cli.main (cli is not below io)"]
    assert violations("from medseg import cli\n", Path("io/x.py"))
    assert violations("from ..cli import main\n", Path("io/x.py"))
    assert violations("from .. import cli\n", Path("io/x.py"))
    assert violations("from . import api\nfrom .image import Image\n", Path("io/x.py")) == []
    assert violations("import medseg.io.image\nfrom medseg.io import api\n", Path("io/x.py")) == []
    assert violations("from medseg import MedsegError, __version__\n", Path("io/x.py")) == []
    assert violations("from medseg.evaluation import report\n", Path("__main__.py")) == []
    assert violations("def f():\n    from medseg.cli import main\n", Path("__init__.py")) == []
    assert violations("if TYPE_CHECKING:\n    from medseg.cli import main\n", Path("__init__.py")) == []
    assert violations("from medseg.cli import main\n", Path("__init__.py"))
    assert violations("if TYPE_CHECKING:\n    from medseg.cli import main\n", Path("io/x.py"))
