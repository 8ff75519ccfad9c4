"""The import structure: no import cycle among the modules of `personalize` (a new one fails with its
path), and the low layers import nothing above them. `lint-imports` (import-linter, contracts in
pyproject.toml) checks the declared layers in CI; this test finds every cycle, which a layers contract
alone does not (two modules of one layer may import each other)."""

from __future__ import annotations

import grimp
import pytest


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("personalize", include_external_packages=False)


def test_no_import_cycles(graph):
    cycles = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back:
                cycles.append(" -> ".join([module, *back]))
    assert not cycles, "import cycles:\n" + "\n".join(cycles[:10])


@pytest.mark.parametrize("module, below", [
    ("personalize.errors", ()),
    ("personalize.utils", ("personalize.errors",)),
    ("personalize.config", ("personalize.errors", "personalize.utils")),
])
def test_leaf_layers_import_only_below(graph, module, below):
    inside = {m for m in graph.modules if m == module or m.startswith(module + ".")}
    upward = sorted({(m, d) for m in inside for d in graph.find_modules_directly_imported_by(m)
                     if d not in inside and not d.startswith(below)})
    assert not upward, f"{module} imports from above it: {upward[:5]}"
