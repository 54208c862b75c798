"""NvmlProbe over a fake pynvml: every NVML failure becomes a GpuProbeError with a hint."""

from __future__ import annotations

import sys

import pytest

from gpusm.errors import GpuProbeError
from gpusm.gpu import NvmlProbe
from tests.gpu.fake_pynvml import FakeGpu, FakeNvml, FakeProcess, NVMLError

_MIB = 1024 * 1024


def probe_with(*gpus: FakeGpu) -> tuple[NvmlProbe, FakeNvml]:
    nvml = FakeNvml(list(gpus) or None)
    return NvmlProbe(nvml), nvml


@pytest.mark.parametrize(
    ("code", "message", "hint"),
    [
        (12, "NVML Shared Library Not Found", "libnvidia-ml.so was not found"),
        (9, "Driver Not Loaded", "kernel driver is not loaded"),
        (15, "GPU is lost", "fell off the bus"),
        (3, "Not Supported", "does not support"),
        (999, "Unknown Error", "nvidia-smi"),
    ],
)
def test_init_failure_becomes_gpu_probe_error_with_nvml_message_and_hint(
    code: int, message: str, hint: str
) -> None:
    probe, nvml = probe_with()
    nvml.fail["nvmlInit"] = code
    with pytest.raises(GpuProbeError, match="initialise NVML") as info:
        probe.device_count()
    assert message in str(info.value)
    assert hint in str(info.value)
    assert isinstance(info.value.__cause__, NVMLError)


@pytest.mark.parametrize(
    "function",
    [
        "nvmlDeviceGetCount",
        "nvmlDeviceGetHandleByIndex",
        "nvmlDeviceGetName",
        "nvmlDeviceGetUUID",
        "nvmlDeviceGetMemoryInfo",
        "nvmlDeviceGetComputeRunningProcesses",
        "nvmlDeviceGetGraphicsRunningProcesses",
    ],
)
def test_gpu_lost_in_any_call_of_a_snapshot_becomes_gpu_probe_error(function: str) -> None:
    probe, nvml = probe_with()
    nvml.fail[function] = 15
    with pytest.raises(GpuProbeError, match=r"GPU is lost.*fell off the bus"):
        probe.snapshot(0)


def test_error_without_a_numeric_code_gets_the_generic_hint() -> None:
    probe, nvml = probe_with()

    def broken() -> int:
        error = NVMLError(0)
        error.value = None  # type: ignore[assignment]
        raise error

    nvml.nvmlDeviceGetCount = broken  # type: ignore[method-assign]
    with pytest.raises(GpuProbeError, match=r"gpu\.backend: sim"):
        probe.device_count()


def test_initialises_once_and_shuts_down_once_on_close() -> None:
    probe, nvml = probe_with()
    probe.device_count()
    probe.snapshot(0)
    probe.snapshot(0)
    assert nvml.inits == 1
    probe.close()
    probe.close()
    assert nvml.shutdowns == 1


def test_close_before_any_read_does_not_touch_nvml() -> None:
    probe, nvml = probe_with()
    probe.close()
    assert (nvml.inits, nvml.shutdowns) == (0, 0)


def test_reading_after_close_raises() -> None:
    probe, _ = probe_with()
    probe.close()
    with pytest.raises(GpuProbeError, match="closed"):
        probe.snapshot(0)


def test_shutdown_failure_becomes_gpu_probe_error() -> None:
    probe, nvml = probe_with()
    probe.device_count()
    nvml.fail["nvmlShutdown"] = 999
    with pytest.raises(GpuProbeError, match="shut NVML down"):
        probe.close()


def test_converts_bytes_to_whole_mib() -> None:
    gpu = FakeGpu(uuid="GPU-x", total_mib=100, used_mib=40)
    gpu.compute = [FakeProcess(pid=10, usedGpuMemory=40 * _MIB - 1)]
    probe, _ = probe_with(gpu)
    snap = probe.snapshot(0)
    assert (snap.total_mib, snap.used_mib, snap.free_mib) == (100, 40, 60)
    assert snap.processes == {10: 39}


def test_merges_compute_and_graphics_lists_without_double_counting() -> None:
    gpu = FakeGpu(uuid="GPU-x")
    gpu.compute = [FakeProcess(1, 500 * _MIB), FakeProcess(2, 100 * _MIB)]
    gpu.graphics = [
        FakeProcess(1, 500 * _MIB),
        FakeProcess(2, 300 * _MIB),
        FakeProcess(3, 7 * _MIB),
    ]
    probe, _ = probe_with(gpu)
    assert probe.snapshot(0).processes == {1: 500, 2: 300, 3: 7}


def test_sums_one_pid_listed_twice_in_one_list() -> None:
    gpu = FakeGpu(uuid="GPU-x", compute=[FakeProcess(1, 100 * _MIB), FakeProcess(1, 50 * _MIB)])
    probe, _ = probe_with(gpu)
    assert probe.snapshot(0).processes == {1: 150}


def test_unavailable_per_process_memory_counts_as_zero() -> None:
    gpu = FakeGpu(uuid="GPU-x", compute=[FakeProcess(5, None)], graphics=[FakeProcess(6, None)])
    probe, _ = probe_with(gpu)
    assert probe.snapshot(0).processes == {5: 0, 6: 0}


def test_graphics_list_not_supported_falls_back_to_compute_list() -> None:
    probe, nvml = probe_with(FakeGpu(uuid="GPU-x", compute=[FakeProcess(5, 64 * _MIB)]))
    nvml.fail["nvmlDeviceGetGraphicsRunningProcesses"] = 3
    assert probe.snapshot(0).processes == {5: 64}


def test_compute_list_not_supported_is_an_error() -> None:
    probe, nvml = probe_with()
    nvml.fail["nvmlDeviceGetComputeRunningProcesses"] = 3
    with pytest.raises(GpuProbeError, match=r"list compute processes.*Not Supported"):
        probe.snapshot(0)


def test_decodes_bytes_names_from_old_pynvml() -> None:
    probe, _ = probe_with(FakeGpu(uuid="GPU-x", name=b"Tesla T4"))
    assert probe.snapshot(0).name == "Tesla T4"


def test_finds_second_device_by_uuid_with_its_index() -> None:
    probe, _ = probe_with(FakeGpu(uuid="GPU-a"), FakeGpu(uuid="GPU-b", total_mib=8192))
    snap = probe.snapshot("GPU-b")
    assert (snap.index, snap.uuid, snap.total_mib) == (1, "GPU-b", 8192)


def test_unknown_uuid_names_the_fix() -> None:
    probe, _ = probe_with()
    with pytest.raises(GpuProbeError, match=r"Not Found.*nvidia-smi -L"):
        probe.snapshot("GPU-nope")


def test_uuid_that_nvml_resolves_but_does_not_list_is_an_error() -> None:
    hidden = FakeGpu(uuid="GPU-hidden")
    probe, nvml = probe_with()
    nvml.nvmlDeviceGetHandleByUUID = lambda uuid: hidden  # type: ignore[method-assign]
    with pytest.raises(GpuProbeError, match="not among the devices"):
        probe.snapshot("GPU-hidden")


@pytest.mark.parametrize("index", [-1, 1, 7, True])
def test_index_out_of_range_names_the_visible_range(index: int) -> None:
    probe, _ = probe_with()
    with pytest.raises(GpuProbeError, match=r"NVML sees 1 \(0\.\.0\)"):
        probe.snapshot(index)


def test_missing_nvidia_ml_py_becomes_gpu_probe_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    with pytest.raises(GpuProbeError, match="pip install nvidia-ml-py"):
        NvmlProbe().device_count()


def test_real_pynvml_without_a_driver_raises_gpu_probe_error_not_nvml_error() -> None:
    probe = NvmlProbe()
    try:
        probe.device_count()
    except GpuProbeError:
        with pytest.raises(GpuProbeError, match="NVML could not"):
            probe.device_count()
    else:
        pytest.skip("an NVIDIA driver is present; the failure path cannot be shown here")
    finally:
        probe.close()
