"""How a service parks and wakes: the ``park:`` key of a service, and its presets.

A parkable service gives its VRAM back while its process stays alive, and takes it
again far faster than a cold start. ``park:`` names a ``preset`` (the real server's
documented requests) or explicit ``sleep:`` / ``wake:`` steps, each an HTTP request or
a signal to the instance. :meth:`ParkConfig.steps` resolves either into one
:class:`ParkSteps`, the only form the engine reads.

* ``vllm``: sleep ``POST {url}/sleep?level={level}``; wake ``POST {url}/wake_up`` (level 2
  also reloads the weights: ``/wake_up?tags=weights``, ``/collective_rpc``
  ``{"method": "reload_weights"}``, ``/wake_up?tags=kv_cache``).
* ``sglang``: ``POST {url}/release_memory_occupation`` / ``resume_memory_occupation``,
  body ``{"tags": [...]}`` when ``tags`` is set, else ``{}``.
* ``ollama``: ``POST {url}/api/generate`` ``{"model": M, "keep_alive": 0}`` / ``-1``.
* ``comfyui``: ``POST {url}/free`` ``{"unload_models": true, "free_memory": true}``; no
  wake request (the next prompt reloads; add a ``warmup:`` step to load ahead).
* ``llamacpp``: ``POST {url}/models/unload`` / ``/models/load`` ``{"model": M}``.

``{url}`` is ``park.url``, else the scheme, host and port of the service's health check.
"""

from __future__ import annotations

import json
import signal as signals
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["PRESETS", "HttpCall", "ParkConfig", "ParkStep", "ParkSteps"]

PRESETS = ("vllm", "sglang", "ollama", "comfyui", "llamacpp")

# What a parked process of each preset keeps, until measured: a CUDA context and the
# allocator's leftovers for servers that stay on the GPU; nothing where the model runs in
# a child process that exits (Ollama's runner, llama.cpp's router children).
_PRESET_RESIDUAL_MIB = {"vllm": 1024, "sglang": 1024, "comfyui": 1024, "ollama": 0, "llamacpp": 0}
_NEEDS_MODEL = ("ollama", "llamacpp")

NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class HttpCall(_Strict):
    """One HTTP request to the service; ``json`` is its body, sent as JSON."""

    method: Literal["GET", "POST", "PUT", "DELETE"] = "POST"
    url: str
    body: Any = Field(default=None, alias="json")
    expect_status: Annotated[int, Field(ge=100, le=599)] = 200
    timeout_s: PosFloat = 30.0

    @model_validator(mode="after")
    def _full_url(self) -> HttpCall:
        _require_url(self.url, "url")
        return self

    def describe(self) -> str:
        """``METHOD url`` and its body, as the event log and the README show it."""
        body = "" if self.body is None else f" {_compact(self.body)}"
        return f"{self.method} {self.url}{body}"


class _Action(_Strict):
    """One step: exactly one of ``http`` or ``signal``."""

    http: HttpCall | None = None
    signal: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> _Action:
        if (self.http is None) == (self.signal is None):
            raise ValueError("give exactly one of http or signal")
        if self.signal is not None:
            name = self.signal.upper()
            name = name if name.startswith("SIG") else f"SIG{name}"
            if not isinstance(getattr(signals, name, None), signals.Signals):
                raise ValueError(f"signal must name a signal like SIGUSR1, got {self.signal!r}")
        return self

    def step(self) -> ParkStep:
        if self.http is not None:
            return ParkStep(http=self.http)
        assert self.signal is not None
        name = self.signal.upper()
        return ParkStep(signal=name if name.startswith("SIG") else f"SIG{name}")


@dataclass(frozen=True)
class ParkStep:
    """One resolved step: an HTTP request, or a signal (by name) to the instance."""

    http: HttpCall | None = None
    signal: str | None = None

    def describe(self) -> str:
        """What the step sends, for events and errors."""
        return self.http.describe() if self.http is not None else f"signal {self.signal}"


@dataclass(frozen=True)
class ParkSteps:
    """Everything the engine needs to park and wake one service."""

    sleep: tuple[ParkStep, ...]
    wake: tuple[ParkStep, ...]
    warmup: tuple[ParkStep, ...]
    residual_mib: int
    tolerance_mib: int
    settle_timeout_s: float
    preset: str | None


class ParkConfig(_Strict):
    """``services.NAME.park``: a ``preset`` or explicit ``sleep`` / ``wake`` steps."""

    preset: Literal["vllm", "sglang", "ollama", "comfyui", "llamacpp"] | None = None
    url: str | None = None
    model: str | None = None
    level: Literal[1, 2] = 1
    tags: list[str] | None = None
    sleep: list[_Action] = []
    wake: list[_Action] = []
    warmup: list[_Action] = []
    residual_mib: NonNegInt | None = None
    tolerance_mib: NonNegInt = 256
    settle_timeout_s: PosFloat = 30.0

    @model_validator(mode="after")
    def _preset_or_steps(self) -> ParkConfig:
        if self.preset is None and not self.sleep:
            raise ValueError(
                f"give preset: ({' | '.join(PRESETS)}) or sleep: [steps] (and wake: [steps])"
            )
        if self.preset is not None and (self.sleep or self.wake):
            raise ValueError("give either preset: or sleep:/wake: steps, not both")
        if self.preset in _NEEDS_MODEL and not self.model:
            raise ValueError(f"the {self.preset} preset needs model: (the model name it serves)")
        if self.url is not None:
            _require_url(self.url, "url")
        return self

    def steps(self, health_url: str | None) -> ParkSteps:
        """The resolved steps; ``health_url`` (the service's health check as a URL) gives
        the base URL when ``url`` is not set. ValueError when a preset has no base URL."""
        if self.preset is None:
            sleep = tuple(a.step() for a in self.sleep)
            wake = tuple(a.step() for a in self.wake)
            residual = self.residual_mib or 0
        else:
            base = self._base(health_url)
            sleep, wake = _preset_steps(self, base)
            residual = (
                self.residual_mib
                if self.residual_mib is not None
                else _PRESET_RESIDUAL_MIB[self.preset]
            )
        return ParkSteps(
            sleep=sleep,
            wake=wake,
            warmup=tuple(a.step() for a in self.warmup),
            residual_mib=residual,
            tolerance_mib=self.tolerance_mib,
            settle_timeout_s=self.settle_timeout_s,
            preset=self.preset,
        )

    def _base(self, health_url: str | None) -> str:
        url = self.url or health_url
        if url is None:
            raise ValueError(
                f"the {self.preset} preset needs the server's address: set park.url "
                "(e.g. http://127.0.0.1:8000) or give the service an http or tcp health check"
            )
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}"


def _preset_steps(park: ParkConfig, base: str) -> tuple[tuple[ParkStep, ...], tuple[ParkStep, ...]]:
    def post(path: str, body: Any = None) -> ParkStep:
        return ParkStep(http=HttpCall(url=f"{base}{path}", body=body))

    if park.preset == "vllm" and park.level == 2:
        # Level 2 dropped the weights: wake the weights' memory, reload them, then the cache.
        return (post("/sleep?level=2"),), (
            post("/wake_up?tags=weights"),
            post("/collective_rpc", {"method": "reload_weights"}),
            post("/wake_up?tags=kv_cache"),
        )
    if park.preset == "vllm":
        return (post("/sleep?level=1"),), (post("/wake_up"),)
    if park.preset == "sglang":
        body = {"tags": park.tags} if park.tags else {}
        return (post("/release_memory_occupation", body),), (
            post("/resume_memory_occupation", body),
        )
    if park.preset == "ollama":
        return (post("/api/generate", {"model": park.model, "keep_alive": 0}),), (
            post("/api/generate", {"model": park.model, "keep_alive": -1}),
        )
    if park.preset == "comfyui":
        return (post("/free", {"unload_models": True, "free_memory": True}),), ()
    # llamacpp
    model = {"model": park.model}
    return (post("/models/unload", model),), (post("/models/load", model),)


def _require_url(url: str, key: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{key} must be a full URL like http://127.0.0.1:8000/…, got {url!r}")


def _compact(body: Any) -> str:
    return json.dumps(body, separators=(",", ":"), sort_keys=True)
