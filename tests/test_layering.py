"""The import graph: the layers of docs/architecture.md hold (pyproject's import-linter contracts)
and no module reaches itself through its imports."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent


def _known_cycle_imports() -> set[tuple[str, str]]:
    """The ``ignore_imports`` of the acyclic contract: imports the refactor still has to remove."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (acyclic,) = [c for c in contracts if c["type"] == "acyclic_siblings"]
    return {tuple(part.strip() for part in line.split("->")) for line in acyclic.get("ignore_imports", [])}


def test_import_linter_contracts_are_kept():
    run = subprocess.run(
        [sys.executable, "-c",
         "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_no_module_import_cycles():
    graph = grimp.build_graph("paratrain", include_external_packages=False, exclude_type_checking_imports=True)
    for importer, imported in _known_cycle_imports():
        if graph.direct_import_exists(importer=importer, imported=imported):
            graph.remove_import(importer=importer, imported=imported)
    cycles: dict[frozenset[str], str] = {}
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain:
                cycles.setdefault(frozenset(chain), " -> ".join((module, *chain)))
    assert not cycles, "import cycles (break each with a lower module both sides import):\n" + "\n".join(
        sorted(cycles.values()))
