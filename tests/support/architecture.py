"""The layer rules of ``gpusm/`` as data, and a checker that reads imports with ``ast``.

Layers, lowest first (see ARCHITECTURE.md): a module may import the standard library,
modules of lower layers, and modules of its own package; never a higher layer, and
never another package of its own layer (so ``api/`` and ``client.py`` cannot see each
other, nor ``engine/`` an adapter). On top of that:

- ``domain/`` imports only pure parts of the standard library and ``transitions``;
- each third-party library is imported only by its one adapter (:data:`LIBRARIES`);
- nothing inside the package imports the package root ``gpusm``.

Every violation names ``file:line``, the import and the rule it breaks.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

__all__ = ["LAYERS", "LIBRARIES", "NARROW", "Import", "Violation", "check_tree", "module_name"]

# (layer, module patterns); a package pattern "gpusm.x.*" also covers "gpusm.x".
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("bottom", ("gpusm.errors", "gpusm.version", "gpusm.clock", "gpusm.crashpoints")),
    ("model", ("gpusm.domain.*", "gpusm.results", "gpusm.park_config")),
    # Config models that check names against the domain (e.g. event types).
    ("config models", ("gpusm.notify_config",)),
    ("config", ("gpusm.config",)),
    ("ports", ("gpusm.ports", "gpusm.procs", "gpusm.lock")),
    # Read models folded from domain events and read through the EventStore port.
    ("views", ("gpusm.timeline.*",)),
    (
        "adapters and engine",
        (
            "gpusm.store.*",
            "gpusm.gpu.*",
            "gpusm.runtimes.*",
            "gpusm.health.*",
            "gpusm.notify.*",
            "gpusm.engine.*",
        ),
    ),
    ("wire", ("gpusm.wire",)),
    ("wiring", ("gpusm.wiring",)),
    ("interfaces", ("gpusm.api.*", "gpusm.client", "gpusm.demo")),
    ("cli", ("gpusm.cli.*",)),
    ("package root", ("gpusm", "gpusm.__main__")),
]

# Packages that may import less than their layer allows: importer pattern -> allowed.
NARROW: dict[str, tuple[str, ...]] = {
    "gpusm.domain.*": ("gpusm.domain.*", "gpusm.errors"),
    "gpusm.ports": (
        "gpusm.domain.*",
        "gpusm.config",
        "gpusm.park_config",
        "gpusm.notify_config",
        "gpusm.errors",
    ),
    "gpusm.engine.*": (
        "gpusm.engine.*",
        "gpusm.ports",
        "gpusm.domain.*",
        "gpusm.config",
        "gpusm.park_config",
        "gpusm.errors",
        "gpusm.results",
        "gpusm.clock",
        "gpusm.crashpoints",
    ),
}

# Third-party library -> the only modules that may import it.
LIBRARIES: dict[str, tuple[str, ...]] = {
    "transitions": ("gpusm.domain.machine",),
    "pynvml": ("gpusm.gpu.nvml",),
    "docker": ("gpusm.runtimes.docker",),
    "psutil": ("gpusm.procs",),
    "sqlalchemy": ("gpusm.store.*",),
    "alembic": ("gpusm.store.*",),
    "fastapi": ("gpusm.api.*",),
    "starlette": ("gpusm.api.*",),
    "uvicorn": ("gpusm.api.*",),
    "anyio": ("gpusm.api.*",),
    "prometheus_client": ("gpusm.api.*",),
    "websockets": ("gpusm.api.*",),
    "typer": ("gpusm.cli.*",),
    "rich": ("gpusm.cli.*",),
    "yaml": ("gpusm.config",),
    "pydantic": (
        "gpusm.config",
        "gpusm.park_config",
        "gpusm.notify_config",
        "gpusm.wire",
        "gpusm.api.*",
    ),
    # pydantic's core, for validation errors with their own type (no generic fix text).
    "pydantic_core": ("gpusm.notify_config",),
    "httpx": ("gpusm.health.*", "gpusm.client", "gpusm.api.proxy*", "gpusm.notify.*"),
}

# The standard library's parts without I/O, clocks or processes: all that domain/ may use.
PURE_STDLIB = {
    "__future__",
    "collections",
    "dataclasses",
    "datetime",
    "enum",
    "functools",
    "itertools",
    "math",
    "typing",
}


@dataclass(frozen=True)
class Import:
    """One imported module name, where it is imported."""

    module: str
    line: int


@dataclass(frozen=True)
class Violation:
    """One import that breaks a rule."""

    file: str
    line: int
    imported: str
    rule: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: imports {self.imported} - {self.rule}"


def module_name(path: Path, root: Path) -> str:
    """The dotted name of ``path`` below ``root`` (the folder that holds ``gpusm/``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, module: str, root: Path) -> Iterator[Import]:
    """Every module ``path`` imports (relative imports resolved; TYPE_CHECKING included).

    ``from gpusm import x`` counts as importing ``gpusm.x`` when ``x`` is a submodule
    under ``root``, and as importing the package root otherwise.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base != "gpusm":
                yield Import(base, node.lineno)
                continue
            for alias in node.names:
                sub = root / "gpusm" / alias.name
                is_module = sub.is_dir() or sub.with_suffix(".py").is_file()
                yield Import(f"gpusm.{alias.name}" if is_module else "gpusm", node.lineno)


_UNPLACED = "the importing module has no layer: add it to LAYERS"


def _matches(module: str, pattern: str) -> bool:
    if pattern.endswith(".*") and module == pattern[:-2]:
        return True
    return fnmatch(module, pattern)


def layer_of(module: str) -> int | None:
    """The index in :data:`LAYERS` of ``module``; None if no layer names it."""
    for index, (_, patterns) in enumerate(LAYERS):
        if any(_matches(module, p) for p in patterns):
            return index
    return None


def _package(module: str) -> str:
    """The unit that may import itself freely: a subpackage, or a top-level module."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _check_gpusm_import(module: str, target: str) -> str | None:
    if target == "gpusm" and module != "gpusm":
        return "nothing inside the package imports the package root"
    mine, theirs = layer_of(module), layer_of(target)
    if mine is None:
        return _UNPLACED
    if theirs is None:
        return None  # a module that does not exist (yet) is the import system's business
    if theirs > mine:
        return f"{LAYERS[mine][0]} may not import the higher layer {LAYERS[theirs][0]}"
    if theirs == mine and _package(module) != _package(target):
        return f"{_package(module)} and {_package(target)} share the layer {LAYERS[mine][0]}"
    for importer, allowed in NARROW.items():
        if _matches(module, importer) and not any(_matches(target, a) for a in allowed):
            return f"{importer} imports only {', '.join(allowed)}"
    return None


def _check_library(module: str, target: str) -> str | None:
    root = target.split(".")[0]
    if root in sys.stdlib_module_names:
        if module.startswith("gpusm.domain") and root not in PURE_STDLIB:
            return "domain/ uses only the standard library's pure parts (no I/O)"
        return None
    owners = LIBRARIES.get(root)
    if owners is None:
        return f"{root} is not an allowed library: give it one adapter in LIBRARIES"
    if not any(_matches(module, p) for p in owners):
        return f"{root} is imported only by {', '.join(owners)}"
    return None


def check_tree(root: Path) -> list[Violation]:
    """Every violation in ``root/gpusm`` (``root`` is the folder that holds the package)."""
    violations: list[Violation] = []
    for path in sorted((root / "gpusm").rglob("*.py")):
        module = module_name(path, root)
        for imp in imports_of(path, module, root):
            top = imp.module.split(".")[0]
            check = _check_gpusm_import if top == "gpusm" else _check_library
            rule = _UNPLACED if layer_of(module) is None else check(module, imp.module)
            if rule is not None:
                where = str(path.relative_to(root))
                violations.append(Violation(where, imp.line, imp.module, rule))
    return violations
