"""``services.NAME.park``: presets resolved into the exact requests, and bad input named."""

from __future__ import annotations

from typing import Any

import pytest

from gpusm.config import parse_config
from gpusm.errors import ConfigError
from gpusm.park_config import ParkSteps

HEALTH = "http://127.0.0.1:8000/health"
TAGS = '{"tags":["weights","kv_cache"]}'


def steps_of(park: dict[str, Any], health: dict[str, Any] | None = None) -> ParkSteps:
    service = {"command": ["x"], "vram_mib": 1000, "health": health or {"http": HEALTH}}
    config = parse_config({"services": {"v": {**service, "park": park}}})
    found = config.services["v"].park_steps()
    assert found is not None
    return found


def sent(steps: Any) -> list[str]:
    return [step.describe() for step in steps]


def test_a_service_without_park_cannot_park() -> None:
    config = parse_config(
        {"services": {"v": {"command": ["x"], "vram_mib": 1, "health": {"http": HEALTH}}}}
    )
    assert config.services["v"].park_steps() is None


@pytest.mark.parametrize(
    ("park", "sleep", "wake", "residual"),
    [
        (
            {"preset": "vllm"},
            ["POST http://127.0.0.1:8000/sleep?level=1"],
            ["POST http://127.0.0.1:8000/wake_up"],
            1024,
        ),
        (
            {"preset": "vllm", "level": 2},
            ["POST http://127.0.0.1:8000/sleep?level=2"],
            [
                "POST http://127.0.0.1:8000/wake_up?tags=weights",
                'POST http://127.0.0.1:8000/collective_rpc {"method":"reload_weights"}',
                "POST http://127.0.0.1:8000/wake_up?tags=kv_cache",
            ],
            1024,
        ),
        (
            {"preset": "sglang", "tags": ["weights", "kv_cache"]},
            [f"POST http://127.0.0.1:8000/release_memory_occupation {TAGS}"],
            [f"POST http://127.0.0.1:8000/resume_memory_occupation {TAGS}"],
            1024,
        ),
        (
            {"preset": "ollama", "model": "qwen2.5:7b"},
            ['POST http://127.0.0.1:8000/api/generate {"keep_alive":0,"model":"qwen2.5:7b"}'],
            ['POST http://127.0.0.1:8000/api/generate {"keep_alive":-1,"model":"qwen2.5:7b"}'],
            0,
        ),
        (
            {"preset": "comfyui"},
            ['POST http://127.0.0.1:8000/free {"free_memory":true,"unload_models":true}'],
            [],
            1024,
        ),
        (
            {"preset": "llamacpp", "model": "m", "residual_mib": 64},
            ['POST http://127.0.0.1:8000/models/unload {"model":"m"}'],
            ['POST http://127.0.0.1:8000/models/load {"model":"m"}'],
            64,
        ),
    ],
    ids=["vllm", "vllm-level2", "sglang", "ollama", "comfyui", "llamacpp"],
)
def test_each_preset_sends_its_servers_documented_requests(
    park: dict[str, Any], sleep: list[str], wake: list[str], residual: int
) -> None:
    steps = steps_of(park)
    assert (sent(steps.sleep), sent(steps.wake), steps.residual_mib) == (sleep, wake, residual)
    assert steps.preset == park["preset"]
    assert (steps.tolerance_mib, steps.settle_timeout_s) == (256, 30.0)


def test_the_base_url_comes_from_park_url_or_a_tcp_check() -> None:
    explicit = steps_of({"preset": "vllm", "url": "http://10.0.0.2:9000/ignored"})
    assert sent(explicit.sleep) == ["POST http://10.0.0.2:9000/sleep?level=1"]
    tcp = steps_of({"preset": "vllm"}, health={"tcp": "127.0.0.1:8100"})
    assert sent(tcp.wake) == ["POST http://127.0.0.1:8100/wake_up"]


def test_explicit_steps_take_http_requests_and_signals() -> None:
    steps = steps_of(
        {
            "sleep": [
                {
                    "http": {
                        "method": "PUT",
                        "url": "http://h:1/off",
                        "json": [1],
                        "expect_status": 204,
                    }
                },
                {"signal": "usr1"},
            ],
            "wake": [{"signal": "SIGCONT"}],
            "warmup": [{"http": {"url": "http://h:1/v1/completions", "json": {"prompt": "hi"}}}],
            "residual_mib": 300,
            "tolerance_mib": 10,
            "settle_timeout_s": 2,
        }
    )
    assert sent(steps.sleep) == ["PUT http://h:1/off [1]", "signal SIGUSR1"]
    assert steps.sleep[0].http is not None
    assert steps.sleep[0].http.expect_status == 204
    assert sent(steps.wake) == ["signal SIGCONT"]
    assert sent(steps.warmup) == ['POST http://h:1/v1/completions {"prompt":"hi"}']
    assert (steps.residual_mib, steps.tolerance_mib, steps.settle_timeout_s) == (300, 10, 2.0)
    assert steps.preset is None


@pytest.mark.parametrize(
    ("park", "key", "problem"),
    [
        ({}, "services.v.park", "give preset: (vllm | sglang | ollama | comfyui | llamacpp)"),
        (
            {"preset": "vllm", "sleep": [{"signal": "USR1"}]},
            "services.v.park",
            "give either preset: or sleep:/wake: steps, not both",
        ),
        ({"preset": "ollama"}, "services.v.park", "the ollama preset needs model:"),
        ({"preset": "llamacpp"}, "services.v.park", "the llamacpp preset needs model:"),
        ({"preset": "tgi"}, "services.v.park.preset", "Input should be 'vllm'"),
        ({"preset": "vllm", "level": 3}, "services.v.park.level", "Input should be 1 or 2"),
        (
            {"sleep": [{"signal": "SIGNOPE"}]},
            "services.v.park.sleep[0]",
            "signal must name a signal like SIGUSR1, got 'SIGNOPE'",
        ),
        ({"sleep": [{}]}, "services.v.park.sleep[0]", "give exactly one of http or signal"),
        (
            {"sleep": [{"http": {"url": "localhost:8000/sleep"}}]},
            "services.v.park.sleep[0].http",
            "url must be a full URL",
        ),
        (
            {"sleep": [{"http": {"url": "http://h:1/", "expect_status": 99}}]},
            "services.v.park.sleep[0].http.expect_status",
            "greater than or equal to 100",
        ),
        (
            {"preset": "vllm", "residual_mib": -1},
            "services.v.park.residual_mib",
            "use a value of zero or more",
        ),
        (
            {"preset": "vllm", "settle_timeout_s": 0},
            "services.v.park.settle_timeout_s",
            "use a value above zero",
        ),
        ({"preset": "vllm", "sleep_level": 1}, "services.v.park.sleep_level", "Extra inputs"),
        ({"preset": "vllm", "url": "nope"}, "services.v.park", "url must be a full URL"),
    ],
)
def test_bad_park_config_names_the_key_and_the_problem(
    park: dict[str, Any], key: str, problem: str
) -> None:
    service = {"command": ["x"], "vram_mib": 1000, "health": {"http": HEALTH}, "park": park}
    with pytest.raises(ConfigError) as info:
        parse_config({"services": {"v": service}})
    assert info.value.key == key
    assert problem in str(info.value)


def test_a_preset_without_any_address_says_how_to_give_one() -> None:
    service = {"command": ["x"], "vram_mib": 1, "health": {"exec": ["true"]}}
    with pytest.raises(ConfigError) as info:
        parse_config({"services": {"v": {**service, "park": {"preset": "vllm"}}}})
    assert "set park.url" in str(info.value)
