"""Fixtures for the store tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.store.store_children import Children


@pytest.fixture
def children() -> Iterator[Children]:
    """Start store-writing child processes; all are killed and reaped afterwards."""
    kids = Children()
    yield kids
    kids.close()
