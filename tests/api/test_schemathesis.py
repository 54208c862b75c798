"""Property-based API testing from the published OpenAPI spec (Schemathesis).

Every operation gets generated requests (with the right token) sent over real HTTP to
a live daemon; no response may be a 500, and every response must match the spec
(status code, content type, headers, body schema).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from gpusm.api.app import create_app
from gpusm.api.threaded import ThreadedServer
from gpusm.config import load_config, parse_config
from tests.api.api_helpers import TOKEN, seed_config, write_config

# The spec does not depend on the config, and building the app opens nothing.
SPEC = create_app(parse_config({}), token=TOKEN).openapi()
schema = schemathesis.openapi.from_dict(SPEC)


@pytest.fixture(scope="module")
def api_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp: Path = tmp_path_factory.mktemp("schemathesis")
    # No pipeline: a generated request never starts background prefetches.
    config = load_config(write_config(tmp, seed_config(tmp, pipeline=[])))
    server = ThreadedServer(config, token=TOKEN, stop_services_on_exit=True).start()
    server.wait_recovered()
    yield server.url
    server.stop()


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_answers_500_and_always_matches_its_spec(
    case: schemathesis.Case[Any], api_url: str
) -> None:
    case.call_and_validate(
        base_url=api_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
    )
