"""A Docker service behind the proxy, on the real engine: a request for its model starts
its container, the answer comes back through gpusm, and the stream is relayed as sent."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.test_proxy import AUTH, Serve, no_leases, states, write_config
from tests.coordinator.docker_coord_helpers import (
    container_ids,
    mixed_seed_config,
    remove_deployment_containers,
    require_test_images,
)
from tests.support.ports import free_port

pytestmark = pytest.mark.docker


@pytest.fixture
def config_path(docker_engine: None, tmp_path: Path) -> Iterator[Path]:
    """The seed with ollama in a container and a model map; its containers removed at the
    end (ask for it before the daemon, so that this teardown runs last)."""
    require_test_images()
    doc = mixed_seed_config(
        tmp_path,
        docker={"ollama": {}},
        pipeline=[],
        api={"listen": f"127.0.0.1:{free_port()}"},
        models={"fake-model": "ollama"},
    )
    path = write_config(tmp_path, doc)
    yield path
    remove_deployment_containers(path)


def test_a_request_for_a_containerised_model_starts_its_container(
    config_path: Path, serve: Serve
) -> None:
    daemon = serve(config_path)
    assert container_ids(config_path, running_only=True) == []
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=90) as http:
        body = {"model": "fake-model", "prompt": "hi", "stream": True}
        body["options"] = {"num_predict": 3}
        with http.stream("POST", "/api/generate", json=body) as answer:
            assert answer.status_code == 200
            lines = [line for line in answer.iter_lines() if line]
        # Three tokens, then the final line: Ollama's NDJSON, relayed line by line.
        assert [json.loads(line)["done"] for line in lines] == [False, False, False, True]
        assert states(http)["ollama"] == "healthy"
        assert len(container_ids(config_path, running_only=True)) == 1
        no_leases(http)
