"""Imports flow one way through the sub-packages (docs/architecture.rst), checked on the source.

Every module's ``import`` statements are read (no module is imported); an import of a
simexplain package that the table below does not allow for the importing package fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "simexplain"

INFRASTRUCTURE = {"errors", "_files", "_progress", "_lazy"}
LOWER = {
    "engine": {"errors"},
    "methods": {"errors", "engine", "_progress"},  # the black-box methods' progress bar
    "attribution": {"errors", "engine", "methods"},
    "training": {"errors", "engine", "methods"},
    "metrics": {"errors", "engine"},
    "data": {"errors", "engine"},
    "viz": {"_files"},
}
BELOW_APPS = set(LOWER) | INFRASTRUCTURE
ALLOWED = {
    **{name: set() for name in INFRASTRUCTURE},
    **LOWER,
    "apps": BELOW_APPS,
    "demo": BELOW_APPS | {"apps"},
    "cli": BELOW_APPS | {"apps", "demo"},
}
# The engine is torch only: no captum, figures, images or files.
ENGINE_FORBIDDEN = {"captum", "matplotlib", "PIL", "numpy", "safetensors", "timm", "torchvision",
                    "json", "os", "pathlib", "shutil", "tempfile", "io"}


def modules() -> list[Path]:
    """Every module but the root ``__init__`` (which names everything, lazily)."""
    return sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def package_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def imported(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``path``, relative ones made absolute."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def own_package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "simexplain" and len(parts) > 1 else None


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path):
    package = package_of(path)
    allowed = ALLOWED[package] | {package}
    wrong = [f"line {line}: {module}" for line, module in imported(path)
             if (target := own_package(module)) is not None and target not in allowed]
    assert not wrong, f"{package} may import only {sorted(allowed)}: {wrong}"


def test_every_package_has_a_rule():
    assert {package_of(p) for p in modules()} <= set(ALLOWED)


def test_the_engine_is_torch_only():
    wrong = [f"{p.name}:{line} {module}" for p in (PACKAGE / "engine").glob("*.py")
             for line, module in imported(p) if module.split(".")[0] in ENGINE_FORBIDDEN]
    assert not wrong, wrong


def test_the_checker_sees_a_wrong_import(tmp_path):
    """The rule fires on an upward import (so the tests above can fail)."""
    fake = PACKAGE / "engine" / "_probe_wrong_import.py"
    fake.write_text("from ..apps.explanation import explain\n", encoding="utf-8")
    try:
        with pytest.raises(AssertionError, match="engine may import only"):
            test_imports_follow_the_layers(fake)
    finally:
        fake.unlink()
