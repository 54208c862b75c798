"""Event stores: SQLite for real use, memory for tests; both satisfy ``gpusm.ports.EventStore``.

Webhook cursors (``gpusm.ports.CursorStore``) live in :mod:`gpusm.store.cursors`.
"""

from gpusm.store.memory import MemoryEventStore
from gpusm.store.sql import SqlEventStore, upgrade

__all__ = ["MemoryEventStore", "SqlEventStore", "upgrade"]
