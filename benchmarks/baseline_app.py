"""The baseline server of figure 7: bare FastAPI + uvicorn answering a fixed JSON body.

``python -m benchmarks.baseline_app --port P --body FILE`` serves ``GET /gpu/status``
with the bytes of FILE (gpusm's own answer, captured in the same run), already encoded,
from a plain ``def`` route in the same thread pool size and with the same uvicorn
settings as ``gpusm serve``: the floor of the framework, so the difference is what
gpusm does to build and encode its answer.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio.to_thread
import uvicorn
from fastapi import FastAPI, Response

__all__ = ["build_app", "main"]

# gpusm.api.app's thread pool size, so both servers queue requests alike.
_THREADS = 256


def build_app(body: bytes) -> FastAPI:
    """An app whose ``GET /gpu/status`` answers ``body`` as JSON."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = _THREADS
        yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/gpu/status")
    def status() -> Response:
        return Response(content=body, media_type="application/json")

    return app


def main() -> None:
    """Serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body", type=Path, required=True)
    args = parser.parse_args()
    app = build_app(args.body.read_bytes())
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
