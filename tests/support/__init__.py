"""Test support shared by every test package: import as ``from tests.support import ...``."""

from tests.support.polling import eventually
from tests.support.ports import free_port
from tests.support.status_server import StatusServer
from tests.support.views import service_status, state_of

__all__ = ["StatusServer", "eventually", "free_port", "service_status", "state_of"]
