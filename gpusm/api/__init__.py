"""The HTTP API of ``gpusm serve``: FastAPI app, schemas, security, problems and metrics.

The client (:mod:`gpusm.client`) never imports this package: both speak
:mod:`gpusm.wire`. The names below load FastAPI on first use (``Listen`` and
``parse_listen`` are :mod:`gpusm.wire`'s).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpusm.api.app import create_app, state_of
    from gpusm.api.server import bind, make_server
    from gpusm.wire import Listen, parse_listen

__all__ = ["Listen", "bind", "create_app", "make_server", "parse_listen", "state_of"]

_HOMES = {
    "create_app": "gpusm.api.app",
    "state_of": "gpusm.api.app",
    "Listen": "gpusm.wire",
    "bind": "gpusm.api.server",
    "make_server": "gpusm.api.server",
    "parse_listen": "gpusm.wire",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'gpusm.api' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
