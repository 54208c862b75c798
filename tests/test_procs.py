"""gpusm.procs on real processes: identity by (pid, create time), trees, markers, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from gpusm import procs
from tests.support import eventually

SLEEP = "import time; time.sleep(60)"
# Starts a child that leaves the session, writes "<own pid> <child pid>" to argv[1].
PARENT = (
    "import os, subprocess, sys, time\n"
    f"c = subprocess.Popen([sys.executable, '-c', {SLEEP!r}], start_new_session=True)\n"
    "open(sys.argv[1] + '.tmp', 'w').write(f'{os.getpid()} {c.pid}')\n"
    "os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
    "time.sleep(60)"
)


@pytest.fixture
def spawn() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Children started by a test; killed and reaped after it."""
    children: list[subprocess.Popen[bytes]] = []
    yield children
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait()


def start(
    spawn: list[subprocess.Popen[bytes]],
    code: str = SLEEP,
    *args: str,
    env: Mapping[str, str] | None = None,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """A child running ``code`` with this Python, remembered for cleanup."""
    child = subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, start_new_session=new_session
    )
    spawn.append(child)
    return child


def gone(pid: int) -> bool:
    return procs.live_create_time(pid) is None


def zombie(child: subprocess.Popen[bytes]) -> None:
    """Kill ``child`` and wait until it is a zombie (not reaped)."""
    child.kill()
    eventually(lambda: gone(child.pid), what="child is a zombie")
    assert procs.create_time(child.pid) is not None  # still in the table


def tree_of(spawn: list[subprocess.Popen[bytes]], tmp_path: Path) -> tuple[int, int]:
    """Start PARENT; returns (parent pid, pid of the child that left the session)."""
    out = tmp_path / f"pids-{uuid.uuid4().hex[:6]}"
    start(spawn, PARENT, str(out))
    eventually(out.exists, what="the tree is up")
    parent, child = (int(p) for p in out.read_text().split())
    return parent, child


# ---------------------------------------------------------------- identity
def test_create_time_of_a_live_child_is_when_it_started(
    spawn: list[subprocess.Popen[bytes]],
) -> None:
    before = time.time()
    child = start(spawn)
    created = procs.create_time(child.pid)
    assert created is not None
    assert before - 1.0 <= created <= time.time() + 1.0
    assert procs.live_create_time(child.pid) == created
    assert procs.create_time(procs.lookup(child.pid)) == created


def test_create_time_is_none_without_a_process() -> None:
    reaped = subprocess.Popen([sys.executable, "-c", "pass"])
    reaped.wait()
    assert procs.create_time(None) is None
    assert procs.lookup(None) is None
    assert procs.lookup(0) is None
    assert procs.lookup(-5) is None
    assert procs.live_create_time(2**22 + 1) is None  # above any Linux pid
    assert procs.create_time(2**22 + 1) is None
    assert procs.cmdline(2**22 + 1) == []
    if procs.lookup(reaped.pid) is None:  # unless the pid was reused at once
        assert procs.create_time(reaped.pid) is None


def test_a_zombie_has_a_create_time_but_is_not_live_or_running(
    spawn: list[subprocess.Popen[bytes]],
) -> None:
    child = start(spawn)
    created = procs.create_time(child.pid)
    zombie(child)
    assert procs.create_time(child.pid) == created
    assert procs.live_create_time(child.pid) is None
    proc = procs.find(child.pid, created)
    assert proc is not None  # still that process, e.g. to be reaped
    assert not procs.running(proc)
    assert procs.is_our_child(proc)


def test_find_matches_pid_and_create_time_only(spawn: list[subprocess.Popen[bytes]]) -> None:
    child = start(spawn)
    created = procs.create_time(child.pid)
    assert created is not None
    proc = procs.find(child.pid, created)
    assert proc is not None
    assert proc.pid == child.pid
    assert procs.running(proc)
    # A recorded create time that differs means the pid was reused: not a match.
    assert procs.find(child.pid, created - 1000.0) is None
    assert procs.find(child.pid, created + 0.01) is None
    assert procs.find(child.pid, created + procs.CREATE_TIME_TOLERANCE_S / 2) is not None
    assert procs.find(child.pid, None) is None
    assert procs.find(None, created) is None


def test_same_create_time() -> None:
    assert procs.same_create_time(100.0, 100.0)
    assert procs.same_create_time(100.0, 100.0 + procs.CREATE_TIME_TOLERANCE_S / 2)
    assert not procs.same_create_time(100.0, 100.01)
    assert procs.same_create_time(100.0, 100.005, tolerance_s=0.01)
    assert not procs.same_create_time(None, 100.0)
    assert not procs.same_create_time(100.0, None)


def test_running_turns_false_when_the_process_ends(spawn: list[subprocess.Popen[bytes]]) -> None:
    child = start(spawn)
    proc = procs.find(child.pid, procs.create_time(child.pid))
    assert proc is not None
    assert procs.running(proc)
    child.kill()
    child.wait()
    assert not procs.running(proc)
    assert not procs.is_our_child(proc)


def test_is_our_child_only_for_children_of_this_process(
    spawn: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    child = start(spawn)
    proc = procs.lookup(child.pid)
    assert proc is not None
    assert procs.is_our_child(proc)
    _, grandchild = tree_of(spawn, tmp_path)
    other = procs.lookup(grandchild)
    assert other is not None
    assert not procs.is_our_child(other)
    me = procs.lookup(os.getpid())
    assert me is not None
    assert not procs.is_our_child(me)
    procs.kill_tree(grandchild)


def test_cmdline_of_a_child(spawn: list[subprocess.Popen[bytes]]) -> None:
    child = start(spawn)
    argv = [sys.executable, "-c", SLEEP]
    # Right after the fork the child may still be exec-ing, with another argv or none.
    eventually(lambda: procs.cmdline(child.pid) == argv, what="the child's argv")


# ---------------------------------------------------------------- trees and signals
def test_tree_and_tree_pids_include_descendants_that_left_the_session(
    spawn: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    parent, child = tree_of(spawn, tmp_path)
    top = procs.find(parent, procs.create_time(parent))
    assert top is not None
    assert {p.pid for p in procs.tree(top)} == {parent, child}
    assert procs.tree_pids(parent) == {parent, child}
    assert procs.tree_pids(child) == {child}
    assert procs.tree_pids(2**22 + 1) == set()
    procs.kill_tree(parent)
    eventually(lambda: gone(parent) and gone(child), what="tree gone")


def test_grow_adds_children_forked_after_the_tree_was_taken(
    spawn: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    # The top starts a child only once $GO exists, i.e. after we took the tree.
    go, out = tmp_path / "go", tmp_path / "late"
    code = (
        "import os, subprocess, sys, time\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        f"c = subprocess.Popen([sys.executable, '-c', {SLEEP!r}])\n"
        f"open({str(out)!r} + '.tmp', 'w').write(str(c.pid))\n"
        f"os.replace({str(out)!r} + '.tmp', {str(out)!r})\n"
        "time.sleep(60)"
    )
    top_child = start(spawn, code)
    top = procs.lookup(top_child.pid)
    assert top is not None
    taken = procs.tree(top)
    assert {p.pid for p in taken} == {top_child.pid}
    go.touch()
    eventually(out.exists, what="late child started")
    late = int(out.read_text())
    assert {p.pid for p in procs.grow(taken)} == {top_child.pid, late}
    procs.kill_tree(top_child.pid)
    eventually(lambda: gone(late), what="late child gone")


def test_signal_tree_signals_the_group_and_each_member(
    spawn: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    # A group leader with a child in its group (the child is only reached via the group).
    out = tmp_path / "member"
    code = (
        "import os, subprocess, sys, time\n"
        f"c = subprocess.Popen([sys.executable, '-c', {SLEEP!r}])\n"
        f"open({str(out)!r} + '.tmp', 'w').write(str(c.pid))\n"
        f"os.replace({str(out)!r} + '.tmp', {str(out)!r})\n"
        "time.sleep(60)"
    )
    leader = start(spawn, code, new_session=True)
    eventually(out.exists, what="member started")
    member = int(out.read_text())
    top = procs.lookup(leader.pid)
    assert top is not None
    procs.signal_tree(top, {top}, signal.SIGTERM)
    assert leader.wait(10) == -signal.SIGTERM
    eventually(lambda: gone(member), what="group member gone")


def test_signal_tree_never_signals_our_own_group(spawn: list[subprocess.Popen[bytes]]) -> None:
    # The child shares our process group; signalling "its group" would hit us too.
    child = start(spawn)
    assert os.getpgid(child.pid) == os.getpgrp()
    top = procs.lookup(child.pid)
    assert top is not None
    procs.signal_tree(top, {top}, signal.SIGTERM)  # we would die here if it did
    assert child.wait(10) == -signal.SIGTERM


def test_signal_tree_leaves_a_reused_pid_alone(spawn: list[subprocess.Popen[bytes]]) -> None:
    child = start(spawn)
    stale = procs.lookup(child.pid)
    assert stale is not None
    child.kill()
    child.wait()  # reaped: the Proc now names a process that no longer exists
    procs.signal_tree(stale, {stale}, signal.SIGKILL)  # no error, nothing signalled
    assert not procs.running(stale)


def test_kill_tree_kills_everything_and_ignores_a_gone_pid(
    spawn: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    parent, child = tree_of(spawn, tmp_path)
    procs.kill_tree(parent)
    eventually(lambda: gone(parent) and gone(child), what="tree gone")
    procs.kill_tree(2**22 + 1)


# ---------------------------------------------------------------- markers
def test_scan_marked_finds_marked_running_processes_with_their_identity(
    spawn: list[subprocess.Popen[bytes]],
) -> None:
    key = f"GPUSM_TEST_MARK_{uuid.uuid4().hex[:8].upper()}"
    marked = start(spawn, env={**os.environ, key: "yes", "GPUSM_OTHER": "x"})
    empty = start(spawn, env={**os.environ, key: ""})  # an empty value is no marker
    unmarked = start(spawn)

    def scan(*keys: str, skip: tuple[int, ...] = ()) -> dict[int, procs.Marked]:
        return {m.pid: m for m in procs.scan_marked(*keys, skip=skip)}

    found = eventually(lambda: scan(key), what="marked child found")
    assert set(found) == {marked.pid}
    (hit,) = found.values()
    assert hit.env[key] == "yes"
    assert hit.env["GPUSM_OTHER"] == "x"
    assert hit.ppid == os.getpid()
    assert hit.create_time == procs.create_time(marked.pid)
    assert hit.proc.pid == marked.pid
    assert scan(key, "GPUSM_OTHER").keys() == {marked.pid}
    assert scan(key, "GPUSM_NOT_SET_ANYWHERE") == {}
    assert scan(key, skip=(marked.pid,)) == {}
    assert empty.pid not in scan(key)
    assert unmarked.pid not in scan(key)
    zombie(marked)
    assert scan(key) == {}


# ---------------------------------------------------------------- attribution
MARKER = "GPUSM_TEST_INSTANCE"
# Forks a grandchild that leaves the session, then exits: the grandchild is re-parented
# away from the top process (an escapee), and writes its pid to argv[1].
ESCAPE = (
    "import os, subprocess, sys\n"
    f"c = subprocess.Popen([sys.executable, '-c', {SLEEP!r}], start_new_session=True)\n"
    "open(sys.argv[1] + '.tmp', 'w').write(str(c.pid))\n"
    "os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
)


def _root(pid: int) -> tuple[int, float | None]:
    return (pid, procs.create_time(pid))


def test_attribute_by_ancestry_names_the_descendants_of_an_instance_top(
    spawn: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    top, child = tree_of(spawn, tmp_path)
    owners = procs.attribute([top, child, os.getpid()], {"i1": _root(top)}, MARKER)
    assert owners == {top: "i1", child: "i1"}


def test_attribute_refuses_a_reused_pid_with_another_create_time(
    spawn: list[subprocess.Popen[bytes]],
) -> None:
    proc = start(spawn)
    eventually(lambda: procs.live_create_time(proc.pid), 10, "the child to run")
    ctime = procs.create_time(proc.pid)
    assert ctime is not None
    # The pid once belonged to instance i1, started 1000 s earlier: not the same process.
    assert procs.attribute([proc.pid], {"i1": (proc.pid, ctime - 1000.0)}, MARKER) == {}
    assert procs.attribute([proc.pid], {"i1": (proc.pid, ctime)}, MARKER) == {proc.pid: "i1"}


def test_attribute_by_marker_finds_an_escapee_whose_parent_is_gone(
    spawn: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    out = tmp_path / "escapee"
    env = {**os.environ, MARKER: "i9"}
    parent = start(spawn, ESCAPE, str(out), env=env, new_session=True)
    parent.wait(timeout=30)
    escapee = int(eventually(lambda: out.exists() and out.read_text(), 10, "the escapee"))
    try:
        # Its top process exited: no ancestry leads to it, but its environment does.
        roots = {"i9": (parent.pid, 1.0)}
        found = eventually(lambda: procs.attribute([escapee], roots, MARKER), 10, "its marker")
        assert found == {escapee: "i9"}
        assert procs.attribute([escapee], {"other": (parent.pid, 1.0)}, MARKER) == {}
    finally:
        procs.kill_tree(escapee)


def test_lineage_is_read_once_per_process(spawn: list[subprocess.Popen[bytes]]) -> None:
    proc = start(spawn, env={**os.environ, MARKER: "i2"})

    def marked() -> procs.Lineage | None:
        found = procs.lineage(proc.pid, MARKER)
        return found if found is not None and found.marker == "i2" else None

    first = eventually(marked, 10, "the child's own environment")
    assert first.ancestors[0][0] == os.getpid()
    assert procs.lineage(proc.pid, MARKER) is first  # the cached reading
    assert procs.lineage(proc.pid, "ANOTHER_KEY") is not first


def test_lineage_of_no_process_is_none() -> None:
    assert procs.lineage(2**22 + 5, MARKER) is None
