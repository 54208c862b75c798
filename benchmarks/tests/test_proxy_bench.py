"""Checks of figure 11's helpers (not timings): its config and its HTTP response reader."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from benchmarks import proxy as fig
from benchmarks.common import write_config
from gpusm import load_config


def test_config_routes_the_model_to_the_fake_service(tmp_path: Path) -> None:
    doc = fig.config_doc(tmp_path, 7000, 7001, 0.5)
    config = load_config(write_config(tmp_path, doc))
    assert config.models == {fig.MODEL: fig.SERVICE}
    service = config.services[fig.SERVICE]
    assert service.upstream_url() == "http://127.0.0.1:7001"
    command = service.command
    assert command is not None
    assert "--tokens-per-s" in command
    assert command[command.index("--model") + 1] == fig.MODEL


def test_added_latency_is_the_difference_of_percentiles() -> None:
    plus = fig.added([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])
    assert plus["p50_s"] == pytest.approx(2.0)
    assert plus["p99_s"] == pytest.approx(2.98)


def _read(raw: bytes) -> tuple[int, bool, bytes]:
    async def go() -> tuple[int, bool, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(raw + b"NEXT")
        reader.feed_eof()
        status, keep = await fig.read_response(reader)
        return status, keep, await reader.read()

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", (200, True, b"NEXT")),
        (
            b"HTTP/1.1 503 X\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
            (503, True, b"NEXT"),
        ),
        (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            (200, False, b"NEXT"),
        ),
        (b"HTTP/1.0 200 OK\r\n\r\nbody to the end", (200, False, b"")),
    ],
)
def test_read_response_consumes_exactly_one_answer(
    raw: bytes, expected: tuple[int, bool, bytes]
) -> None:
    assert _read(raw) == expected
