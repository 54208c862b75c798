"""The store package's public names change only on purpose."""

from __future__ import annotations

import gpusm.store


def test_store_package_exports_exactly_these_names() -> None:
    assert gpusm.store.__all__ == ["MemoryEventStore", "SqlEventStore", "upgrade"]
    for name in gpusm.store.__all__:
        assert getattr(gpusm.store, name) is not None
