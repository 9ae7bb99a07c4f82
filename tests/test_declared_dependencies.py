"""Every package the code imports is declared in pyproject.toml, found by scanning the imports.

A package that only arrives through another one's dependencies disappears the day that one drops it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: The project's own packages, and the benchmark scripts, which import each other as top-level modules.
FIRST_PARTY = {"importer", "reflection_operator", "localcluster", "tests", "bench", "scripts", "conftest"} | {
    path.stem for path in (REPO / "bench").glob("*.py")
}


def _imported_top_level_modules(*folders: str) -> set[str]:
    modules: set[str] = set()
    for folder in folders:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    modules.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m not in FIRST_PARTY}


def _declared(requirements: list[str]) -> set[str]:
    return {_normalise(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]) for requirement in requirements}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _distributions(modules: set[str]) -> dict[str, set[str]]:
    by_module = importlib.metadata.packages_distributions()
    return {module: {_normalise(d) for d in by_module.get(module, [])} for module in modules}


def _missing(modules: set[str], declared: set[str]) -> dict[str, set[str]]:
    return {module: dists for module, dists in _distributions(modules).items() if not dists & declared}


PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
RUNTIME = _declared(PROJECT["dependencies"])
DEV = _declared(PROJECT["optional-dependencies"]["dev"])


def test_what_the_shipped_code_imports_is_a_runtime_dependency():
    # pytest is imported by localcluster's pytest plugin only, which runs under the dev tools.
    modules = _imported_top_level_modules("importer", "operator", "localcluster") - {"pytest"}
    assert modules, "the scan found no imports"
    assert _missing(modules, RUNTIME) == {}


def test_what_the_tests_scripts_and_benchmarks_import_is_declared():
    modules = _imported_top_level_modules("tests", "bench", "scripts", "localcluster")
    assert _missing(modules, RUNTIME | DEV) == {}
