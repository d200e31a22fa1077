"""The layout: the script uses the package, never the other way round; each module imports alone; a plain run
loads no module that only an optional flag needs."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "fashion_cnn"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
OPTIONAL = {"data_files", "decode", "photos", "predict", "ray_runs", "study", "tensorboard_logs"}  # behind a flag


def imported_names(path: Path) -> set[str]:
    """The modules of the package, and ConvolutionalNN, that a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == "fashion_cnn":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.removeprefix("fashion_cnn."))
        elif isinstance(node, ast.Import):
            found |= {alias.name.removeprefix("fashion_cnn.") for alias in node.names}
    return found & {*MODULES, "ConvolutionalNN"}


def loaded_modules(code: str) -> tuple[int, set[str], str]:
    """Run code in a fresh interpreter in the repository; its exit code, the package modules then loaded, stderr."""
    listing = "print(' '.join(m.removeprefix('fashion_cnn.') for m in sys.modules if m.startswith('fashion_cnn.')))"
    proc = subprocess.run([sys.executable, "-c", f"import sys\n{code}\n{listing}"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)
    return proc.returncode, set(proc.stdout.split()), proc.stderr


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_alone_without_the_script(module: str) -> None:
    code, loaded, stderr = loaded_modules(f"import fashion_cnn.{module}\nassert 'ConvolutionalNN' not in sys.modules")
    assert code == 0, stderr
    assert module in loaded


def test_imports_run_one_way_with_no_cycle() -> None:
    graph = {module: imported_names(PACKAGE / f"{module}.py") for module in MODULES}
    assert not [m for m, deps in graph.items() if "ConvolutionalNN" in deps], "the package never imports the script"
    order = list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
    assert order.index("common") < order.index("backends") < order.index("streams")


def test_the_script_loads_no_module_that_only_a_flag_needs() -> None:
    code, loaded, stderr = loaded_modules("import ConvolutionalNN\nConvolutionalNN.parse_args([])")
    assert code == 0, stderr
    assert loaded and not loaded & OPTIONAL, f"loaded without their flags: {sorted(loaded & OPTIONAL)}"
    assert {"common", "backends", "streams"} <= loaded


def test_the_script_reads_in_one_sitting_and_each_module_stays_small() -> None:
    def lines(path: Path) -> int:
        return len(path.read_text(encoding="utf-8").splitlines())

    assert lines(REPO / "ConvolutionalNN.py") <= 900
    assert {m: lines(PACKAGE / f"{m}.py") for m in MODULES if lines(PACKAGE / f"{m}.py") > 500} == {}
