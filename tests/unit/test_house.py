"""The house rules a reader relies on: the installed package imports on its own, the tree passes
the linter (with its complexity limit), package imports form no circle, and the argparse
namespace stops at the edge (scripts, cli, checks, builders)."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "sdft"
# The only modules below the scripts that see the argparse namespace (tiny.py and lora_tools.py are
# their own commands).
FLAG_READERS = {"sdft.cli", "sdft.checks", "sdft.builders", "sdft.tiny", "sdft.lora_tools"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def sdft_imports(path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports, at any level (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name in known}
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}   # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target] if target in path else [node, target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_package_imports_form_no_circle():
    modules = package_modules()
    graph = {name: sdft_imports(path, set(modules)) - {name} for name, path in modules.items()}
    # A package's __init__ may name its modules; importing a module imports its package first.
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_the_argparse_namespace_stops_at_the_edge():
    readers = {name for name, path in package_modules().items()
               if re.search(r"\bargparse\b", path.read_text())}
    assert readers <= FLAG_READERS, f"modules below the edge that handle argparse: {sorted(readers - FLAG_READERS)}"
    guessed = [f"{path.relative_to(REPO)}:{number}" for path in [*PACKAGE.rglob("*.py"), *REPO.glob("*.py"),
                                                               *(REPO / "benchmarks").glob("*.py")]
               if module_name(path) not in {"sdft.cli", "sdft.checks"}
               for number, line in enumerate(path.read_text().splitlines(), 1) if "getattr(args" in line]
    assert guessed == [], "getattr(args, ...) outside cli/checks: declare the flag in cli.WHEN_ABSENT instead"


def test_the_tree_passes_the_linter():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_the_built_wheel_holds_every_module_and_imports_without_the_checkout(tmp_path):
    source = tmp_path / "source"   # a copy, so the build leaves nothing in the checkout
    shutil.copytree(PACKAGE, source / "sdft", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", source)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], cwd=tmp_path, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("sdft-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if name.endswith(".py")}
        archive.extractall(site)
    missing = sorted(str(path.relative_to(REPO)) for path in PACKAGE.rglob("*.py")
                     if str(path.relative_to(REPO)) not in shipped)
    assert missing == [], f"not in the wheel: {missing}"
    names = sorted(package_modules())
    probe = ("import importlib, sys\n"
             f"for name in {names!r}:\n"
             "    module = importlib.import_module(name)\n"
             f"    assert module.__file__.startswith({str(site)!r}), module.__file__\n"
             "print('imported', len(sys.modules))\n")
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.parametrize("script", ["train_text_to_image.py", "train_text_to_image_sdxl.py",
                                    "train_dreambooth_sd3.py"])
def test_each_script_shows_its_three_phases(script):
    source = (REPO / script).read_text()
    main = source[source.index("def main("):]
    assert re.search(r"with build\(", main) and "trainer.train(run)" in main and "output.finish(run)" in main
    assert len(source.splitlines()) < 100
