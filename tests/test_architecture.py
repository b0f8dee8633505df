"""The package's shape, held by tests: layers (import-linter), no cycles, no imports hidden in
functions to dodge one, a docstring per layer, modules of readable size, ruff clean."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bench"
BIN = Path(sys.executable).parent
MAX_LINES = 400
LONGER = {}  # module path → why it may exceed MAX_LINES (none today)


def layers() -> list[str]:
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    return contract["layers"]


def strongly_connected(graph: grimp.ImportGraph) -> list[list[str]]:
    """Tarjan's algorithm over the module graph: every group of modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return groups


def lint_imports(cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=120)


def test_every_layer_is_declared_in_the_contract_and_the_contract_is_kept():
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert sorted(name.removeprefix("bench.") for name in layers()) == packages
    flat = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert flat == [], "every module belongs to a layer"
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The contract can fail: a copy of the package with one low module importing the CLI."""
    shutil.copytree(PACKAGE, tmp_path / "bench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    registry = tmp_path / "bench" / "base" / "registry.py"
    registry.write_text(registry.read_text() + "\nfrom bench.cli import args  # noqa: E402,F401\n")
    env = {"PATH": str(BIN), "PYTHONPATH": str(tmp_path), "HOME": str(tmp_path)}
    result = lint_imports(tmp_path, env)
    assert result.returncode != 0
    assert "bench.base is not allowed to import bench.cli" in result.stdout
    assert "bench.base.registry -> bench.cli.args" in result.stdout


def test_the_module_graph_has_no_cycles():
    graph = grimp.build_graph("bench")
    assert len(graph.modules) > 40
    assert strongly_connected(graph) == []


def test_a_cycle_is_found_when_there_is_one():
    graph = grimp.ImportGraph()
    for module in ("a", "b", "c"):
        graph.add_module(module)
    graph.add_import(importer="a", imported="b")
    graph.add_import(importer="b", imported="a")
    graph.add_import(importer="b", imported="c")
    assert strongly_connected(graph) == [["a", "b"]]


def function_imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, imported module, the line before) of every import inside a function."""
    text = path.read_text()
    lines = text.splitlines()
    found = []
    for function in ast.walk(ast.parse(text)):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    found += [(node.lineno, alias.name, lines[node.lineno - 2]) for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    found.append((node.lineno, node.module or "", lines[node.lineno - 2]))
    return found


def test_no_import_inside_a_function_except_a_heavy_library_with_its_reason():
    bench_imports, unexplained = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, module, before in function_imports(path):
            where = f"{path.relative_to(ROOT)}:{line} {module}"
            if module == "bench" or module.startswith("bench."):
                bench_imports.append(where)  # a deferred import of our own code only hides a cycle
            elif "# lazy:" not in before:
                unexplained.append(where)
    assert bench_imports == []
    assert unexplained == []


def test_every_layer_says_what_lives_there_and_what_it_may_import():
    for name in layers():
        doc = ast.get_docstring(ast.parse((PACKAGE / name.removeprefix("bench.") / "__init__.py").read_text()))
        assert doc and "May import" in doc, name


def test_modules_stay_readable():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES and str(p.relative_to(ROOT)) not in LONGER}
    assert long == {}


def test_ruff_is_clean():
    result = subprocess.run([str(BIN / "ruff"), "check", "bench", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
