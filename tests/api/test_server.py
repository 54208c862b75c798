"""Parsing ``HOST:PORT`` and binding the daemon's port, with clear errors."""

from __future__ import annotations

import socket

import pytest

from gpusm.api.server import bind, bound_port
from gpusm.errors import ConfigError, GpusmError
from gpusm.wire import Listen, parse_listen


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:7723", "127.0.0.1", 7723),
        (" localhost:0 ", "localhost", 0),
        ("[::1]:8000", "::1", 8000),
        ("0.0.0.0:80", "0.0.0.0", 80),
    ],
)
def test_listen_addresses_parse(text: str, host: str, port: int) -> None:
    assert parse_listen(text) == Listen(host, port)


@pytest.mark.parametrize("text", ["nonsense", ":80", "[::1]", "[::1]x", "host:99999", "host:-1"])
def test_malformed_listen_addresses_are_config_errors_naming_the_source(text: str) -> None:
    with pytest.raises(ConfigError, match=r"--listen: .* is not HOST:PORT"):
        parse_listen(text, "--listen")


def test_urls_use_loopback_for_wildcard_addresses() -> None:
    assert Listen("0.0.0.0", 1).url == "http://127.0.0.1:1"
    assert Listen("::", 2).url == "http://[::1]:2"
    assert Listen("::1", 3).url == "http://[::1]:3"
    assert Listen("gpu-box", 4).url == "http://gpu-box:4"


def test_bind_gives_a_listening_socket_on_a_free_port() -> None:
    sock = bind(Listen("127.0.0.1", 0))
    try:
        port = bound_port(sock)
        assert port > 0
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        sock.close()


def test_bind_failures_say_what_is_wrong() -> None:
    with pytest.raises(GpusmError, match="cannot resolve listen host"):
        bind(Listen("no-such-host.invalid", 0))
    # TEST-NET-1 is never an address of this machine.
    with pytest.raises(GpusmError, match=r"cannot listen on 192\.0\.2\.1:0"):
        bind(Listen("192.0.2.1", 0))
