"""The layers of docs/architecture.md, checked on the source: foundation → models → training → service.

Import-time torch checks elsewhere only catch imports that pull torch in; this reads every module's
imports (top level and inside functions), so a torch-free but wrong-way import fails too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI_MODULES = {"cli.py", "cli_models.py", "__main__.py"}  # the CLI sits on top and may import any layer

# folder -> import roots its modules must never import
FORBIDDEN = {
    "mnemo": ("torch", "mnemo.models", "mnemo.training", "mnemo.service", "mnemo.benchmarks"),
    "models": ("mnemo.training", "mnemo.service", "mnemo.benchmarks"),
    "training": ("mnemo.service", "mnemo.benchmarks"),
    "service": ("torch", "mnemo.models", "mnemo.training", "mnemo.benchmarks"),
}
TORCH_BACKEND = ROOT / "service" / "backends.py"  # the TorchScript runner imports torch when chosen


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _modules(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if p.name not in CLI_MODULES)


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_module_imports_a_layer_above_it(folder):
    bad = []
    for path in _modules(folder):
        for name in imported(path):
            for root in FORBIDDEN[folder]:
                if (name == root or name.startswith(root + ".")) and not (
                    path == TORCH_BACKEND and root == "torch"
                ):
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from mnemo.training import run\n    import torch\n")
    assert {"mnemo.training", "mnemo.training.run", "torch"} <= imported(module)
