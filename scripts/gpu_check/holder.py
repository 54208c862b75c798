"""A stand-in model server that holds real GPU memory: what the pipeline check runs.

Allocates ``--mib`` MiB on CUDA device ``--device`` (an ordinal after
CUDA_VISIBLE_DEVICES; torch, cupy or libcuda, see cudamem.py), then answers
``GET /health`` with 200 on ``--port`` until SIGTERM, when it exits at once (the driver
frees the memory as the process ends). Like a model server, it is not healthy until its
memory is loaded.

If the allocation does not fit it prints ``gpusm-holder: OOM``, drops a marker file in
``--oom-dir`` (if given) and exits with 3, the code gpusm's fake server uses for OOM;
with no way to allocate at all it exits with 4. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cudamem import NoBackend, OutOfMemory, allocate

EXIT_OOM = 3
EXIT_NO_BACKEND = 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "cupy", "cuda"])
    parser.add_argument("--oom-dir", type=Path)
    parser.add_argument("--name", default="holder")
    # Marks the holders of one run, so that run.py can find any left behind.
    parser.add_argument("--run-token", default="")
    args = parser.parse_args(argv)

    # From here on SIGTERM ends the process at once, even mid-allocation.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    began = time.monotonic()
    try:
        block = allocate(args.mib, args.device, args.backend)
    except OutOfMemory as exc:
        print(f"gpusm-holder: OOM: {args.name} wanted {args.mib} MiB: {exc}", flush=True)
        if args.oom_dir is not None:
            args.oom_dir.mkdir(parents=True, exist_ok=True)
            (args.oom_dir / f"{args.name}-{os.getpid()}").write_text(str(exc))
        return EXIT_OOM
    except NoBackend as exc:
        print(f"gpusm-holder: cannot allocate GPU memory: {exc}", flush=True)
        return EXIT_NO_BACKEND
    body = json.dumps(
        {
            "status": "ok",
            "name": args.name,
            "backend": block.backend,
            "mib": args.mib,
            "pid": os.getpid(),
            "load_s": round(time.monotonic() - began, 3),
        }
    ).encode()
    print(f"gpusm-holder: {body.decode()}", flush=True)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = 200 if self.path.split("?")[0] in ("/health", "/") else 404
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", args.port), Handler) as server:
        server.serve_forever(poll_interval=0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
