"""The Runtime contract: behaviour every runtime (native, in-memory, docker) must show.

Use it by subclassing in a ``test_*.py`` module::

    from tests.contracts.runtime_contract import RuntimeContract

    class TestMyRuntimeContract(RuntimeContract):
        grace_s = 1.0                       # docker's stop timeout is whole seconds

        def create_runtime(self, tmp_path): ...      # give it a distinctive ``kind``
        def sleeping_service(self, runtime, name): ...
        def sigterm_ignoring_service(self, runtime, name): ...
        def forking_service(self, runtime, name): ...
        def exiting_service(self, runtime, name, code): ...
        def chatty_service(self, runtime, name, lines): ...
        def unstartable_service(self, runtime, name): ...

and, where the defaults (pids are host pids; a crash is SIGKILL to ``handle.pid`` and
reads as exit code -9; a stale handle is one with another create time; the sleeping
service writes nothing) do not fit, override ``crash``, ``killed_exit_code``,
``pid_exists``, ``stale_handle``, ``reopen_runtime``, ``silent_service`` or
``wait_until_ready``.

The fixture ``runtime`` stops every instance a test started through ``self.start``
(even if the test failed), and every instance id is unique, so tests of several
runtimes (and of other people) can run side by side on one machine.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from gpusm import procs
from gpusm.config import ServiceConfig
from gpusm.errors import GpusmError, ServiceRuntimeError, ServiceStartFailed
from gpusm.ports import Handle, Placement, Runtime
from tests.support import eventually

__all__ = ["RuntimeContract"]


class RuntimeContract(abc.ABC):
    """Abstract test case; a subclass supplies the runtime and its kinds of service."""

    #: Grace period given to stops in these tests.
    grace_s: ClassVar[float] = 0.5
    #: Bound on how long a runtime may take to notice an exit, start or stop.
    patience_s: ClassVar[float] = 15.0

    # ---------------------------------------------------------------- hooks
    @abc.abstractmethod
    def create_runtime(self, tmp_path: Path) -> Runtime:
        """A fresh runtime whose files (logs…) go under ``tmp_path``."""

    @abc.abstractmethod
    def sleeping_service(self, runtime: Runtime, name: str) -> ServiceConfig:
        """A service that runs until stopped and exits promptly on SIGTERM."""

    @abc.abstractmethod
    def sigterm_ignoring_service(self, runtime: Runtime, name: str) -> ServiceConfig:
        """A service that ignores SIGTERM (only SIGKILL ends it)."""

    @abc.abstractmethod
    def forking_service(self, runtime: Runtime, name: str) -> ServiceConfig:
        """A service whose main process starts at least two long-lived descendants."""

    @abc.abstractmethod
    def exiting_service(self, runtime: Runtime, name: str, code: int = 3) -> ServiceConfig:
        """A service that exits by itself with ``code`` within about a second of starting."""

    @abc.abstractmethod
    def chatty_service(self, runtime: Runtime, name: str, lines: list[str]) -> ServiceConfig:
        """A service that writes ``lines`` to its output, then runs until stopped."""

    @abc.abstractmethod
    def unstartable_service(self, runtime: Runtime, name: str) -> ServiceConfig:
        """A service whose start must fail (missing program or image)."""

    # A hook with a do-nothing default on purpose: most runtimes need no readiness wait.
    def wait_until_ready(  # noqa: B027
        self, runtime: Runtime, handle: Handle, service: ServiceConfig
    ) -> None:
        """Block until the instance has set up its signal handlers and children."""

    def silent_service(self, runtime: Runtime, name: str) -> ServiceConfig:
        """A service that runs until stopped and never writes (default: the sleeping one)."""
        return self.sleeping_service(runtime, name)

    def crash(self, runtime: Runtime, handle: Handle) -> None:
        """Make the instance die as if it crashed (default: SIGKILL its top pid)."""
        assert handle.pid is not None
        os.kill(handle.pid, signal.SIGKILL)

    def killed_exit_code(self, sig: signal.Signals) -> int:
        """The exit code ``exit_code`` reports after death by ``sig`` (default: ``-sig``)."""
        return -int(sig)

    def pid_exists(self, runtime: Runtime, pid: int) -> bool:
        """Whether ``pid`` (from ``pids_of``) is a live process (default: a host pid)."""
        return procs.live_create_time(pid) is not None

    def stale_handle(self, handle: Handle) -> Handle:
        """A handle that names the same pid but not this instance (the pid was reused)."""
        assert handle.create_time is not None
        return dataclasses.replace(handle, create_time=handle.create_time - 1000.0)

    def reopen_runtime(self, runtime: Runtime, tmp_path: Path) -> Runtime:
        """A second runtime on the same machine, as a restarted coordinator would make."""
        return self.create_runtime(tmp_path)

    # ---------------------------------------------------------------- helpers
    @pytest.fixture
    def runtime(self, tmp_path: Path) -> Iterator[Runtime]:
        """The runtime under test; every instance started through ``start`` is stopped after."""
        self.tmp_path = tmp_path
        self._started: list[tuple[Runtime, Handle]] = []
        rt = self.create_runtime(tmp_path)
        yield rt
        for owner, handle in reversed(self._started):
            with contextlib.suppress(GpusmError):
                owner.stop(handle, 0.1)

    def start(
        self,
        runtime: Runtime,
        service: ServiceConfig,
        *,
        ready: bool = True,
        placement: Placement | None = None,
    ) -> Handle:
        """Start ``service`` under a unique instance id and remember it for cleanup."""
        instance = f"ct-{uuid.uuid4().hex[:16]}"
        handle = runtime.start(service, instance, placement)
        self._started.append((runtime, handle))
        if ready:
            self.wait_until_ready(runtime, handle, service)
        return handle

    def name(self) -> str:
        """A unique, valid service name."""
        return f"svc-{uuid.uuid4().hex[:8]}"

    def ended_with(self, runtime: Runtime, handle: Handle) -> int:
        """Wait until the instance is seen dead and its exit code known; return that."""
        eventually(lambda: not runtime.is_alive(handle), self.patience_s, "seen dead")
        eventually(lambda: runtime.exit_code(handle) is not None, self.patience_s, "exit code")
        code = runtime.exit_code(handle)
        assert code is not None
        return code

    def mine(self, runtime: Runtime, instance: str) -> list[Handle]:
        """``find_orphans`` narrowed to one instance (other tests run beside us)."""
        return [h for h in runtime.find_orphans() if h.instance == instance]

    # ---------------------------------------------------------------- behaviour
    def test_started_instance_is_alive_with_its_identity(self, runtime: Runtime) -> None:
        name = self.name()
        handle = self.start(runtime, self.sleeping_service(runtime, name))
        assert handle.service == name
        assert handle.instance.startswith("ct-")
        assert handle.pid is not None or handle.container_id is not None
        assert runtime.is_alive(handle)

    def test_instance_placed_on_several_devices_runs_and_stops(self, runtime: Runtime) -> None:
        # Whatever the devices are (none here are real), a placement only shapes the
        # instance's environment and device request: it starts, runs and stops as usual.
        placement = Placement(indices=(1, 0), uuids=("GPU-contract-1", "GPU-contract-0"))
        service = self.sleeping_service(runtime, self.name())
        handle = self.start(runtime, service, placement=placement)
        assert runtime.is_alive(handle)
        assert runtime.pids_of(handle)
        result = runtime.stop(handle, self.grace_s)
        assert (result.escalated, result.already_dead) == (False, False)
        assert not runtime.is_alive(handle)

    def test_pids_of_a_live_instance_include_its_top_pid(self, runtime: Runtime) -> None:
        handle = self.start(runtime, self.sleeping_service(runtime, self.name()))
        pids = runtime.pids_of(handle)
        assert pids
        assert all(self.pid_exists(runtime, pid) for pid in pids)
        if handle.pid is not None:
            assert handle.pid in pids

    def test_stops_a_cooperative_service_without_escalating(self, runtime: Runtime) -> None:
        handle = self.start(runtime, self.sleeping_service(runtime, self.name()))
        result = runtime.stop(handle, self.grace_s * 10)
        assert not result.escalated
        assert not result.already_dead
        assert result.duration_s >= 0
        assert not runtime.is_alive(handle)
        assert runtime.pids_of(handle) == set()

    def test_ignores_sigterm_and_is_killed_after_grace(self, runtime: Runtime) -> None:
        handle = self.start(runtime, self.sigterm_ignoring_service(runtime, self.name()))
        pids = runtime.pids_of(handle)
        result = runtime.stop(handle, self.grace_s)
        assert result.escalated
        assert result.duration_s >= self.grace_s * 0.95
        assert not runtime.is_alive(handle)
        assert not any(self.pid_exists(runtime, pid) for pid in pids)

    def test_forked_descendants_do_not_survive_the_stop(self, runtime: Runtime) -> None:
        handle = self.start(runtime, self.forking_service(runtime, self.name()))
        eventually(lambda: len(runtime.pids_of(handle)) >= 3, self.patience_s, "3 pids")
        pids = runtime.pids_of(handle)
        runtime.stop(handle, self.grace_s)
        assert not runtime.is_alive(handle)
        eventually(
            lambda: not any(self.pid_exists(runtime, pid) for pid in pids),
            self.patience_s,
            f"all of {sorted(pids)} gone",
        )

    def test_crashed_instance_is_seen_dead_and_its_stop_says_already_dead(
        self, runtime: Runtime
    ) -> None:
        handle = self.start(runtime, self.sleeping_service(runtime, self.name()))
        self.crash(runtime, handle)
        eventually(lambda: not runtime.is_alive(handle), self.patience_s, "seen dead")
        assert runtime.pids_of(handle) == set()
        result = runtime.stop(handle, self.grace_s)
        assert result.already_dead
        assert not result.escalated

    def test_service_that_exits_by_itself_is_seen_dead(self, runtime: Runtime) -> None:
        handle = self.start(runtime, self.exiting_service(runtime, self.name()), ready=False)
        eventually(lambda: not runtime.is_alive(handle), self.patience_s, "seen dead")
        assert runtime.stop(handle, self.grace_s).already_dead

    def test_signal_reaches_the_instance(self, runtime: Runtime) -> None:
        handle = self.start(runtime, self.sleeping_service(runtime, self.name()))
        runtime.signal(handle, "SIGKILL")
        eventually(lambda: not runtime.is_alive(handle), self.patience_s, "killed by the signal")

    def test_signal_to_an_instance_that_is_gone_names_it(self, runtime: Runtime) -> None:
        handle = self.start(runtime, self.sleeping_service(runtime, self.name()))
        runtime.stop(handle, self.grace_s * 10)
        with pytest.raises(ServiceRuntimeError, match="cannot send SIGUSR1: it is not running"):
            runtime.signal(handle, "SIGUSR1")

    def test_second_stop_reports_already_dead(self, runtime: Runtime) -> None:
        handle = self.start(runtime, self.sleeping_service(runtime, self.name()))
        runtime.stop(handle, self.grace_s * 10)
        again = runtime.stop(handle, self.grace_s * 10)
        assert again.already_dead
        assert not again.escalated

    def test_attribute_names_the_instance_of_its_own_and_its_descendants_pids(
        self, runtime: Runtime
    ) -> None:
        handle = self.start(runtime, self.forking_service(runtime, self.name()))
        other = self.start(runtime, self.sleeping_service(runtime, self.name()))
        eventually(lambda: len(runtime.pids_of(handle)) >= 3, self.patience_s, "3 pids")
        pids = runtime.pids_of(handle)
        others = runtime.pids_of(other)
        found = runtime.attribute([*pids, *others, os.getpid()], [handle, other])
        assert {pid for pid, h in found.items() if h == handle} == pids
        assert {pid for pid, h in found.items() if h == other} == others
        assert os.getpid() not in found  # this test process is nobody's

    def test_attribute_gives_nothing_to_a_stale_handle(self, runtime: Runtime) -> None:
        handle = self.start(runtime, self.sleeping_service(runtime, self.name()))
        pids = runtime.pids_of(handle)
        assert runtime.attribute(pids, [handle]) == dict.fromkeys(pids, handle)
        # The same pid with another create time is another process: not this instance's.
        stale = dataclasses.replace(self.stale_handle(handle), instance=f"{handle.instance}-x")
        assert runtime.attribute(pids, [stale]) == {}

    def test_reused_pid_is_not_mistaken_for_the_instance(self, runtime: Runtime) -> None:
        handle = self.start(runtime, self.sleeping_service(runtime, self.name()))
        stale = self.stale_handle(handle)
        assert not runtime.is_alive(stale)
        assert runtime.pids_of(stale) == set()
        # Stopping the stale handle must leave the process that owns the pid alone.
        assert runtime.stop(stale, self.grace_s).already_dead
        assert runtime.is_alive(handle)

    def test_stopping_one_instance_leaves_another_of_the_same_service_running(
        self, runtime: Runtime
    ) -> None:
        service = self.sleeping_service(runtime, self.name())
        first, second = self.start(runtime, service), self.start(runtime, service)
        assert first != second
        runtime.stop(first, self.grace_s * 10)
        assert not runtime.is_alive(first)
        assert runtime.is_alive(second)

    def test_another_runtime_finds_the_instance_as_an_orphan(self, runtime: Runtime) -> None:
        name = self.name()
        handle = self.start(runtime, self.forking_service(runtime, name))
        eventually(lambda: len(runtime.pids_of(handle)) >= 3, self.patience_s, "3 pids")
        other = self.reopen_runtime(runtime, self.tmp_path)
        found = self.mine(other, handle.instance)
        # Only the top of the instance, not each of its descendants.
        assert len(found) == 1
        assert found[0].service == name
        assert other.is_alive(found[0])
        if handle.pid is not None:
            assert found[0].pid == handle.pid
        if handle.container_id is not None:
            assert found[0].container_id == handle.container_id
        other.stop(found[0], self.grace_s)
        assert not runtime.is_alive(handle)
        assert self.mine(other, handle.instance) == []

    def test_start_that_cannot_launch_raises_service_start_failed(self, runtime: Runtime) -> None:
        name = self.name()
        with pytest.raises(ServiceStartFailed) as info:
            self.start(runtime, self.unstartable_service(runtime, name), ready=False)
        assert info.value.service == name
        assert name in str(info.value)

    # ---------------------------------------------------------------- kind
    def test_handles_carry_the_runtime_kind(self, runtime: Runtime) -> None:
        assert runtime.kind
        handle = self.start(runtime, self.sleeping_service(runtime, self.name()))
        assert handle.kind == runtime.kind
        other = self.reopen_runtime(runtime, self.tmp_path)
        assert [h.kind for h in self.mine(other, handle.instance)] == [other.kind]

    # ---------------------------------------------------------------- exit codes
    def test_exit_code_is_none_while_the_instance_runs(self, runtime: Runtime) -> None:
        handle = self.start(runtime, self.sleeping_service(runtime, self.name()))
        assert runtime.exit_code(handle) is None
        assert runtime.exit_code(self.stale_handle(handle)) is None

    @pytest.mark.parametrize("code", [0, 3])
    def test_exit_code_of_an_instance_that_exited_by_itself(
        self, runtime: Runtime, code: int
    ) -> None:
        handle = self.start(runtime, self.exiting_service(runtime, self.name(), code), ready=False)
        assert self.ended_with(runtime, handle) == code
        assert runtime.exit_code(handle) == code  # it stays known

    def test_exit_code_of_a_killed_instance_names_the_signal(self, runtime: Runtime) -> None:
        handle = self.start(runtime, self.sleeping_service(runtime, self.name()))
        self.crash(runtime, handle)
        assert self.ended_with(runtime, handle) == self.killed_exit_code(signal.SIGKILL)

    def test_exit_code_of_an_instance_never_started_is_none(self, runtime: Runtime) -> None:
        assert runtime.exit_code(Handle(self.name(), "ct-never", kind=runtime.kind)) is None

    # ---------------------------------------------------------------- logs
    def test_log_tail_returns_the_last_lines_the_instance_wrote(self, runtime: Runtime) -> None:
        lines = [f"line {i} of {uuid.uuid4().hex[:6]}" for i in range(5)]
        handle = self.start(runtime, self.chatty_service(runtime, self.name(), lines))
        eventually(
            lambda: runtime.log_tail(handle, 2) == "\n".join(lines[-2:]),
            self.patience_s,
            "the last two lines",
        )
        assert runtime.log_tail(handle).splitlines()[-5:] == lines
        assert runtime.log_tail(handle, 1) == lines[-1]

    def test_log_tail_of_an_instance_that_never_wrote_is_empty(self, runtime: Runtime) -> None:
        handle = self.start(runtime, self.silent_service(runtime, self.name()))
        assert runtime.is_alive(handle)
        assert runtime.log_tail(handle) == ""

    def test_log_tail_of_an_instance_never_started_is_empty(self, runtime: Runtime) -> None:
        assert runtime.log_tail(Handle(self.name(), "ct-never", kind=runtime.kind)) == ""

    # ---------------------------------------------------------------- close
    def test_close_twice_is_fine_and_leaves_instances_running(self, runtime: Runtime) -> None:
        handle = self.start(runtime, self.sleeping_service(runtime, self.name()))
        other = self.reopen_runtime(runtime, self.tmp_path)
        other.close()
        other.close()
        assert runtime.is_alive(handle)
