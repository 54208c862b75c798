"""The behaviour every GpuProbe promises; each backend's test class supplies the probe.

A backend subclasses :class:`GpuProbeContract` and implements ``make_probe`` and, when it
can make a process hold memory, ``hold``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gpusm.errors import GpuProbeError
from gpusm.ports import GpuProbe

__all__ = ["GpuProbeContract"]


class GpuProbeContract:
    """Abstract: subclasses provide ``make_probe`` (and ``hold`` if they can)."""

    def make_probe(self, tmp_path: Path) -> GpuProbe:
        raise NotImplementedError

    def hold(self, probe: GpuProbe, mib: int) -> int:
        """Make one process hold ``mib`` MiB on device 0; returns its pid."""
        pytest.skip("this backend cannot be made to hold memory on demand")

    @pytest.fixture
    def probe(self, tmp_path: Path) -> Iterator[GpuProbe]:
        probe = self.make_probe(tmp_path)
        yield probe
        probe.close()

    def test_sees_at_least_one_device(self, probe: GpuProbe) -> None:
        assert probe.device_count() >= 1

    def test_reports_consistent_memory_numbers(self, probe: GpuProbe) -> None:
        snap = probe.snapshot(0)
        assert snap.index == 0
        assert snap.uuid
        assert snap.name
        assert snap.total_mib > 0
        assert snap.used_mib >= 0
        assert snap.free_mib >= 0
        assert snap.used_mib + snap.free_mib <= snap.total_mib
        assert all(pid > 0 and mib >= 0 for pid, mib in snap.processes.items())

    def test_device_by_uuid_is_the_device_by_index(self, probe: GpuProbe) -> None:
        by_index = probe.snapshot(0)
        by_uuid = probe.snapshot(by_index.uuid)
        assert (by_uuid.index, by_uuid.uuid, by_uuid.name, by_uuid.total_mib) == (
            by_index.index,
            by_index.uuid,
            by_index.name,
            by_index.total_mib,
        )

    def test_default_device_is_index_zero(self, probe: GpuProbe) -> None:
        assert probe.snapshot().uuid == probe.snapshot(0).uuid

    def test_unknown_index_raises_gpu_probe_error(self, probe: GpuProbe) -> None:
        with pytest.raises(GpuProbeError):
            probe.snapshot(probe.device_count() + 5)

    def test_unknown_uuid_raises_gpu_probe_error(self, probe: GpuProbe) -> None:
        with pytest.raises(GpuProbeError):
            probe.snapshot("GPU-00000000-dead-beef-0000-000000000000")

    def test_close_is_idempotent(self, probe: GpuProbe) -> None:
        probe.close()
        probe.close()

    def test_attributes_held_memory_to_the_holding_pid(self, probe: GpuProbe) -> None:
        before = probe.snapshot(0)
        pid = self.hold(probe, 512)
        after = probe.snapshot(0)
        assert after.processes.get(pid) == before.processes.get(pid, 0) + 512
        assert after.used_mib == before.used_mib + 512
        assert after.free_mib == before.free_mib - 512
