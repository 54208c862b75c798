"""A separate process that writes to an event store, for the SQLite concurrency tests.

store_child.py race URL    reads "append STREAM VERSION" lines from stdin and answers
                           "won SEQ" or "conflict"; "quit" ends it
store_child.py zygote URL  for each "go" line on stdin, forks a writer that appends
                           batches to streams s0..s3 until killed and says
                           "ready PID" after its first commit; when that writer is
                           gone, says "reaped STATUS" (forking skips the imports, so
                           twenty kills take seconds, not tens of seconds)
"""

from __future__ import annotations

import os
import random
import sys
from datetime import UTC, datetime

from gpusm.domain.events import NewEvent
from gpusm.errors import ConcurrencyConflict
from gpusm.store import SqlEventStore


def _event(stream: str, version: int, data: dict[str, object]) -> NewEvent:
    return NewEvent(stream, version, "VramObserved", datetime.now(UTC), None, "healthy", data)


def race(url: str) -> None:
    store = SqlEventStore(url)
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        try:
            recorded = store.append([_event(words[1], int(words[2]), {"pid": os.getpid()})])
        except ConcurrencyConflict:
            print("conflict", flush=True)
        else:
            print(f"won {recorded[0].seq}", flush=True)
    store.close()


def churn(url: str, parent: int) -> None:
    store = SqlEventStore(url)
    rng = random.Random()
    first = True
    # Stop if the zygote is gone, so a failed test leaves no writer behind.
    while os.getppid() == parent:
        heads = store.heads()
        batch_id = rng.randrange(1 << 60)
        streams = rng.sample(["s0", "s1", "s2", "s3"], rng.randint(1, 4))
        per_stream = rng.randint(1, 5)
        data: dict[str, object] = {"batch": batch_id, "size": len(streams) * per_stream}
        store.append(
            [
                _event(s, (heads[s].version if s in heads else 0) + n, data)
                for s in streams
                for n in range(1, per_stream + 1)
            ]
        )
        if first:
            print(f"ready {os.getpid()}", flush=True)
            first = False


def zygote(url: str) -> None:
    for line in sys.stdin:
        if line.strip() != "go":
            break
        me = os.getpid()
        pid = os.fork()
        if pid == 0:
            try:
                churn(url, me)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(f"reaped {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    {"race": race, "zygote": zygote}[sys.argv[1]](sys.argv[2])
