"""The packages' layering, read from their import statements: artifacts below everything; the runtime and the
compiler side by side (neither imports the other); the CLI's modules (llmc/) on top."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAY_NOT_IMPORT = {
    "artifacts": ("llmc.compiler", "llmc.passes", "llmc.runtime", "llmc.kernels"),
    "runtime": ("llmc.compiler", "llmc.passes"),
    "compiler": ("llmc.runtime",),
    "passes": ("llmc.runtime",),
    "kernels": ("llmc.compiler", "llmc.passes", "llmc.runtime"),
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("package", sorted(MAY_NOT_IMPORT))
def test_package_imports_only_the_layers_below(package):
    crossings = [f"{path.relative_to(ROOT)} imports {name}" for path in sorted((ROOT / package).glob("*.py"))
                 for name in sorted(_imports(path)) if name.startswith(MAY_NOT_IMPORT[package])]
    assert not crossings, crossings
