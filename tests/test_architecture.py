"""Every import in ``gpusm/`` points down the layers (rules: ``tests/support/architecture.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.architecture import LAYERS, check_tree, layer_of, module_name

ROOT = Path(__file__).resolve().parents[1]


def test_every_import_in_the_package_follows_the_layers() -> None:
    violations = [str(v) for v in check_tree(ROOT)]
    assert violations == [], "\n".join(violations)


def test_every_module_of_the_package_has_a_layer() -> None:
    unplaced = [
        module_name(path, ROOT)
        for path in sorted((ROOT / "gpusm").rglob("*.py"))
        if layer_of(module_name(path, ROOT)) is None
    ]
    assert unplaced == []


def test_layers_list_domain_first_and_the_cli_last() -> None:
    names = [name for name, _ in LAYERS]
    assert names.index("model") < names.index("ports") < names.index("adapters and engine")
    assert names.index("wire") < names.index("interfaces") < names.index("cli")


def _plant(tmp_path: Path, files: dict[str, str]) -> list[str]:
    """A fake checkout holding ``files`` (path -> source); returns its violations."""
    for rel, source in {"gpusm/__init__.py": "", **files}.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(tmp_path).parents:
            init = tmp_path / parent / "__init__.py"
            if parent != Path(".") and not init.exists():
                init.write_text("")
        path.write_text(source)
    return [str(v) for v in check_tree(tmp_path)]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param(
            {"gpusm/domain/policy.py": "import os\n"},
            "gpusm/domain/policy.py:1: imports os - domain/ uses only the standard library's "
            "pure parts (no I/O)",
            id="domain-io",
        ),
        pytest.param(
            {"gpusm/domain/policy.py": "x = 1\nfrom gpusm.store import sql\n"},
            "gpusm/domain/policy.py:2: imports gpusm.store - model may not import the higher "
            "layer adapters and engine",
            id="domain-adapter",
        ),
        pytest.param(
            {"gpusm/engine/coordinator.py": "from gpusm.runtimes.native import NativeRuntime\n"},
            "gpusm/engine/coordinator.py:1: imports gpusm.runtimes.native - gpusm.engine and "
            "gpusm.runtimes share the layer adapters and engine",
            id="engine-adapter",
        ),
        pytest.param(
            {"gpusm/engine/monitor.py": "from gpusm import procs\n", "gpusm/procs.py": ""},
            "gpusm/engine/monitor.py:1: imports gpusm.procs - gpusm.engine.* imports only "
            "gpusm.engine.*, gpusm.ports, gpusm.domain.*, gpusm.config, gpusm.park_config, "
            "gpusm.errors, gpusm.results, gpusm.clock, gpusm.crashpoints",
            id="engine-os",
        ),
        pytest.param(
            {"gpusm/engine/state.py": "from gpusm.wiring import open_store\n"},
            "gpusm/engine/state.py:1: imports gpusm.wiring - adapters and engine may not import "
            "the higher layer wiring",
            id="engine-wiring",
        ),
        pytest.param(
            {"gpusm/client.py": "from gpusm.api.problems import HttpProblem\n"},
            "gpusm/client.py:1: imports gpusm.api.problems - gpusm.client and gpusm.api share "
            "the layer interfaces",
            id="client-api",
        ),
        pytest.param(
            {"gpusm/api/doctor.py": "from gpusm.client import Client\n"},
            "gpusm/api/doctor.py:1: imports gpusm.client - gpusm.api and gpusm.client share the "
            "layer interfaces",
            id="api-client",
        ),
        pytest.param(
            {"gpusm/api/routes.py": "from gpusm import __version__\n"},
            "gpusm/api/routes.py:1: imports gpusm - nothing inside the package imports the "
            "package root",
            id="package-root",
        ),
        pytest.param(
            {"gpusm/runtimes/native.py": "import psutil\n"},
            "gpusm/runtimes/native.py:1: imports psutil - psutil is imported only by gpusm.procs",
            id="library-owner",
        ),
        pytest.param(
            {"gpusm/cli/main.py": "import uvicorn\n"},
            "gpusm/cli/main.py:1: imports uvicorn - uvicorn is imported only by gpusm.api.*",
            id="uvicorn-outside-api",
        ),
        pytest.param(
            {"gpusm/config.py": "import numpy\n"},
            "gpusm/config.py:1: imports numpy - numpy is not an allowed library: give it one "
            "adapter in LIBRARIES",
            id="unknown-library",
        ),
        pytest.param(
            {"gpusm/health/checks.py": "from ..runtimes.native import kill_tree\n"},
            "gpusm/health/checks.py:1: imports gpusm.runtimes.native - gpusm.health and "
            "gpusm.runtimes share the layer adapters and engine",
            id="relative-import",
        ),
        pytest.param(
            {"gpusm/ports.py": "from gpusm.engine.state import Engine\n"},
            "gpusm/ports.py:1: imports gpusm.engine.state - ports may not import the higher "
            "layer adapters and engine",
            id="ports-engine",
        ),
        pytest.param(
            {"gpusm/newthing.py": "import json\n"},
            "gpusm/newthing.py:1: imports json - the importing module has no layer: add it to "
            "LAYERS",
            id="unplaced-module",
        ),
    ],
)
def test_a_planted_violation_is_named_with_file_line_and_rule(
    tmp_path: Path, files: dict[str, str], expected: str
) -> None:
    assert expected in _plant(tmp_path, files)


def test_allowed_imports_are_not_flagged(tmp_path: Path) -> None:
    files = {
        "gpusm/domain/machine.py": "from transitions import Machine\nfrom gpusm.errors import E\n",
        "gpusm/errors.py": "",
        "gpusm/engine/coordinator.py": "from gpusm.ports import Runtime\nfrom . import state\n",
        "gpusm/engine/state.py": "import threading\n",
        "gpusm/ports.py": "from gpusm.domain.events import Event\n",
        "gpusm/wiring.py": "from gpusm.runtimes.native import NativeRuntime\n",
        "gpusm/api/app.py": "import fastapi\nfrom gpusm.wire import encode\n",
        "gpusm/wire.py": "import pydantic\n",
        "gpusm/cli/main.py": "import typer\nfrom gpusm.api.app import app\n",
        "gpusm/__init__.py": "from gpusm.wiring import open_coordinator\n",
    }
    assert _plant(tmp_path, files) == []
