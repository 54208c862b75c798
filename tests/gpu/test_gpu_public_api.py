"""The public names of ``gpusm.gpu`` change only on purpose."""

from __future__ import annotations

import gpusm.gpu


def test_public_api_is_pinned() -> None:
    assert gpusm.gpu.__all__ == ["NvmlProbe", "SimAllocation", "SimGpu", "SimProbe"]


def test_only_the_nvml_module_imports_pynvml() -> None:
    from pathlib import Path

    package = Path(gpusm.gpu.__file__).parent.parent
    importers = sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if any(s in path.read_text(encoding="utf-8") for s in ("import pynvml", "from pynvml"))
    )
    assert importers == ["gpu/nvml.py"]
