"""``gpusm/domain`` stays pure: only the standard library's pure parts and ``transitions``."""

from __future__ import annotations

import ast
from pathlib import Path

DOMAIN = Path(__file__).resolve().parents[2] / "gpusm" / "domain"

ALLOWED_ROOTS = {
    "__future__",
    "collections",
    "dataclasses",
    "datetime",
    "enum",
    "functools",
    "itertools",
    "math",
    "typing",
    "transitions",
    "gpusm",
}
ALLOWED_GPUSM = ("gpusm.domain", "gpusm.errors")


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_domain_imports_nothing_that_does_io() -> None:
    files = sorted(DOMAIN.glob("*.py"))
    assert files, "no domain modules found"
    offenders = []
    for path in files:
        for name in imports_of(path):
            root = name.split(".")[0]
            foreign = root not in ALLOWED_ROOTS
            if foreign or (root == "gpusm" and not name.startswith(ALLOWED_GPUSM)):
                offenders.append(f"{path.name}: {name}")
    assert offenders == []


def test_the_checker_catches_an_io_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom sqlalchemy import text\nfrom gpusm.store import sql\n")
    assert imports_of(bad) == ["os", "sqlalchemy", "gpusm.store"]
