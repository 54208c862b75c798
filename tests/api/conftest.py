"""Fixtures: the API served over real HTTP on 127.0.0.1, over a real coordinator."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpusm.api.threaded import ThreadedServer
from gpusm.config import load_config
from tests.api.api_helpers import TOKEN, seed_config, write_config


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    """The seed config written to a file."""
    return write_config(tmp_path, seed_config(tmp_path))


@pytest.fixture
def serve() -> Iterator[Callable[..., ThreadedServer]]:
    """Starts API servers (stopping their services at the end) and stops them all."""
    started: list[ThreadedServer] = []

    def factory(path: Path, *, recovered: bool = True, **kwargs: Any) -> ThreadedServer:
        kwargs.setdefault("token", TOKEN)
        kwargs.setdefault("stop_services_on_exit", True)
        server = ThreadedServer(load_config(path), **kwargs)
        started.append(server)
        server.start()
        if recovered:
            server.wait_recovered()
        return server

    yield factory
    for server in reversed(started):
        server.stop()


@pytest.fixture
def live(serve: Callable[..., ThreadedServer], config_path: Path) -> ThreadedServer:
    """A recovered server for the seed config."""
    return serve(config_path)


@pytest.fixture
def http(live: ThreadedServer) -> Iterator[httpx.Client]:
    """An HTTP client for ``live`` that sends the right token."""
    with httpx.Client(
        base_url=live.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
    ) as client:
        yield client
