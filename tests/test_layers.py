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


def test_files_and_functions_stay_readable():
    """No library file over 400 lines, no function over 80 (files you can read top to bottom)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "personalize"
    long_files, long_functions = [], []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > 400:
            long_files.append(f"{path.relative_to(root)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long_functions.append(f"{path.relative_to(root)}:{node.lineno} {node.name}")
    assert not long_files and not long_functions, long_files + long_functions


def test_the_command_line_parser_imports_no_heavy_library():
    """`personalize --help` and friends answer at once: building the parser imports neither torch nor diffusers."""
    import subprocess
    import sys

    code = ("import sys; from personalize.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft', 'accelerate') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_a_bad_recipe_is_refused_without_importing_a_model_library():
    """Config validation (every method's options) is free of torch: a typo is answered at once."""
    import subprocess
    import sys

    code = ("import sys\nfrom personalize.recipes import load_config\nfrom personalize.errors import ConfigError\n"
            "for o in (['lora.rnak=4'], ['lora.rank=0']):\n"
            "    try:\n        load_config('recipes/tiny/lora.yaml', o)\n    except ConfigError as e:\n        print(e)\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft', 'accelerate') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert "did you mean 'rank'" in lines[0] and "lora.rank: must be > 0" in lines[1]
    assert lines[-1] == "[]", result.stdout
