"""The proxy's keys: ``api.keys``, ``services.NAME.listen|auth|ignore_paths``, ``models``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gpusm.config import Config, is_loopback, parse_config
from gpusm.errors import ConfigError


def config_with(
    service: dict[str, Any] | None = None, api: dict[str, Any] | None = None, **top: Any
) -> Config:
    base = {"command": ["x"], "vram_mib": 1000, "health": {"http": "http://127.0.0.1:8000/health"}}
    doc: dict[str, Any] = {"services": {"llm": {**base, **(service or {})}}, **top}
    if api is not None:
        doc["api"] = api
    return parse_config(doc, base=Path("/srv/gpusm"))


def test_keys_resolve_their_token_files_against_the_config_folder() -> None:
    config = config_with(
        api={"keys": [{"name": "batch", "token_file": "keys/batch", "priority": -5}]}
    )
    (key,) = config.api.keys
    assert (key.name, key.priority, key.services) == ("batch", -5, None)
    assert key.token_file == Path("/srv/gpusm/keys/batch")


def test_a_listener_with_its_defaults() -> None:
    svc = config_with({"listen": "127.0.0.1:11434", "ignore_paths": ["/ws*"]}).services["llm"]
    assert (svc.listen, svc.auth) == ("127.0.0.1:11434", "token")
    assert svc.ignores("/ws")
    assert svc.ignores("/ws/client-1")
    assert not svc.ignores("/api/chat")


@pytest.mark.parametrize(
    ("service", "api", "key", "says"),
    [
        ({"listen": "11434"}, None, "services.llm", "HOST:PORT"),
        ({"listen": "0.0.0.0:11434", "auth": "none"}, None, "services.llm", "only on a loopback"),
        ({"auth": "none"}, None, "services.llm", "set listen too"),
        ({"ignore_paths": ["ws"]}, None, "services.llm", "starting with /"),
        ({"listen": "127.0.0.1:7723"}, None, "services.llm.listen", "used by api.listen"),
        ({"listen": "127.0.0.1:8000"}, None, "services.llm.listen", "used by service llm"),
        (
            None,
            {"keys": [{"name": "admin", "token_file": "k"}]},
            "api.keys[0].name",
            "daemon's own token",
        ),
        (
            None,
            {"keys": [{"name": "a", "token_file": "k"}, {"name": "a", "token_file": "j"}]},
            "api.keys[1].name",
            "is taken",
        ),
        (
            None,
            {"keys": [{"name": "a", "token_file": "k", "services": ["nope"]}]},
            "api.keys[0].services[0]",
            "unknown service 'nope'",
        ),
        (None, {"keys": [{"name": "a"}]}, "api.keys[0].token_file", "required"),
    ],
)
def test_mistakes_are_refused_naming_the_key(
    service: dict[str, Any] | None, api: dict[str, Any] | None, key: str, says: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        config_with(service, api)
    assert key in str(refused.value)
    assert says in str(refused.value)


def test_two_listeners_on_one_port_are_refused() -> None:
    entry = {"command": ["x"], "vram_mib": 1, "listen": "127.0.0.1:9100"}
    doc = {
        "services": {
            "a": {**entry, "health": {"http": "http://127.0.0.1:8001/"}},
            "b": {**entry, "health": {"http": "http://127.0.0.1:8002/"}},
        }
    }
    with pytest.raises(ConfigError, match=r"services\.b\.listen.*services\.a\.listen"):
        parse_config(doc)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        *[("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True)],
        *[("0.0.0.0", False), ("192.168.1.4", False), ("example.org", False), ("::", False)],
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
