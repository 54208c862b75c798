"""The public names of the API package and the client are pinned: they change only on purpose."""

from __future__ import annotations

import subprocess
import sys

import pytest

import gpusm.api
import gpusm.client


def test_public_api_is_pinned() -> None:
    assert gpusm.api.__all__ == [
        "Listen",
        "bind",
        "create_app",
        "make_server",
        "parse_listen",
        "state_of",
    ]
    assert gpusm.client.__all__ == ["DEFAULT_URL", "Client", "daemon_url", "find_daemon"]
    for name in gpusm.api.__all__:
        assert callable(getattr(gpusm.api, name))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = gpusm.api.nope


def test_the_client_does_not_load_the_server_stack() -> None:
    code = (
        "import sys, gpusm.client; gpusm.client.daemon_url('127.0.0.1:1');"
        "print(sorted(m for m in sys.modules if m.partition('.')[0] in"
        " ('fastapi', 'uvicorn', 'starlette', 'prometheus_client') or m.startswith('gpusm.api')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"
