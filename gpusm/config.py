"""The configuration file (``gpusm.yaml``): models, defaults, validation and loading.

``load_config(path)`` returns a validated :class:`Config` whose relative paths are
resolved against the file's folder, or raises :class:`~gpusm.errors.ConfigError` with
one message naming the file, the key path and the fix.

What cannot be told from the file alone is checked by :func:`check_folders` (can the
state folder be created?), which ``gpusm config check`` runs, and by
:func:`make_folder`, which creates a folder and turns the OS's refusal into a
ConfigError; :func:`require_services` refuses a config that defines no services.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

from gpusm.errors import ConfigError
from gpusm.notify_config import Webhooks
from gpusm.park_config import ParkConfig, ParkSteps

__all__ = [
    "SERVICE_KINDS",
    "AnyService",
    "ApiConfig",
    "ApiKeyConfig",
    "Config",
    "DockerServiceConfig",
    "GpuConfig",
    "HealthConfig",
    "NativeServiceConfig",
    "PhaseConfig",
    "ProxyConfig",
    "RestartConfig",
    "ServiceConfig",
    "SimGpuConfig",
    "check_devices",
    "check_folders",
    "find_config_path",
    "folder_problem",
    "is_loopback",
    "load_config",
    "make_folder",
    "parse_config",
    "require_services",
    "split_listen",
    "sqlite_file",
    "to_yaml",
]

NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SimGpuConfig(_Strict):
    """The simulated GPUs: how many, their sizes, how long the 'driver' takes to free
    memory, where they live."""

    # One size for every device, or one size per device.
    total_mib: Annotated[int, Field(gt=0)] | list[Annotated[int, Field(gt=0)]] = 24576
    devices: Annotated[int, Field(ge=1, le=16)] = 1
    reclaim_lag_s: NonNegFloat = 0.2
    dir: Path | None = None

    @model_validator(mode="after")
    def _sizes_match(self) -> SimGpuConfig:
        if isinstance(self.total_mib, list) and len(self.total_mib) not in (1, self.devices):
            if self.devices == 1 and "devices" not in self.model_fields_set:
                return self  # `devices` left out: it is the number of sizes given
            raise ValueError(
                f"total_mib lists {len(self.total_mib)} sizes for {self.devices} devices; "
                "give one size, or one per device"
            )
        return self

    @property
    def sizes(self) -> list[int]:
        """The size of each simulated device, in device order."""
        if isinstance(self.total_mib, int):
            return [self.total_mib] * self.devices
        if len(self.total_mib) == 1:
            return self.total_mib * self.devices
        return list(self.total_mib)


class GpuConfig(_Strict):
    """Which GPU backend to read, and the admission and settling knobs."""

    backend: Literal["nvml", "sim"] = "nvml"
    reserve_mib: NonNegInt = 512
    settle_timeout_s: PosFloat = 5.0
    # Where a service that may use several devices goes: binpack fills the device where
    # it fits with the fewest, cheapest evictions; spread picks the one with most room.
    placement: Literal["binpack", "spread"] = "binpack"
    sim: SimGpuConfig = SimGpuConfig()


class HealthConfig(_Strict):
    """How to tell that a service is ready: exactly one of ``http``, ``tcp`` or ``exec``."""

    http: str | None = None
    tcp: str | None = None
    exec: list[str] | None = None
    expect_status: int = 200
    # None = adaptive schedule (fast first, never slower than 1 s).
    interval_s: PosFloat | None = None
    # Deadline for the whole start (launch to healthy).
    timeout_s: PosFloat = 300.0
    # Bound on one probe.
    probe_timeout_s: PosFloat = 2.0
    # Consecutive failed probes of a healthy service before it counts as crashed.
    failures_before_crash: Annotated[int, Field(ge=1)] = 3

    @model_validator(mode="after")
    def _exactly_one(self) -> HealthConfig:
        given = [k for k in ("http", "tcp", "exec") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of http, tcp or exec"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.http is not None:
            parts = urlsplit(self.http)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"http must be a full URL like http://127.0.0.1:8188/health, got {self.http!r}"
                )
        if self.tcp is not None:
            host, _, port = self.tcp.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"tcp must be host:port, got {self.tcp!r}")
        return self

    def port(self) -> int | None:
        """The TCP port this check talks to, if any."""
        if self.http is not None:
            parts = urlsplit(self.http)
            return parts.port or (443 if parts.scheme == "https" else 80)
        if self.tcp is not None:
            return int(self.tcp.rpartition(":")[2])
        return None


class RestartConfig(_Strict):
    """What to do when a healthy service dies unasked."""

    policy: Literal["no", "on-failure"] = "on-failure"
    backoff_initial_s: PosFloat = 1.0
    backoff_max_s: PosFloat = 60.0
    max_starts: Annotated[int, Field(ge=1)] = 5
    window_s: PosFloat = 600.0


class ServiceConfig(_Strict):
    """One model server: how big it is, how important, how to check it, how to stop it.

    What the engine reads. How to *run* it depends on ``runtime``, which picks one of
    the subclasses (:class:`NativeServiceConfig`, :class:`DockerServiceConfig`); only
    that runtime's adapter reads their fields.
    """

    name: str = ""
    runtime: str = "native"
    env: dict[str, str] = {}
    vram_mib: NonNegInt
    priority: int = 0
    # The device it must run on, the devices it may use, or "auto" (any).
    gpu: Literal["auto"] | NonNegInt | list[NonNegInt] = "auto"
    # Devices one instance spans (e.g. tensor parallel); vram_mib is per device.
    gpu_count: Annotated[int, Field(ge=1)] = 1
    health: HealthConfig
    stop_timeout_s: PosFloat = 10.0
    drain_timeout_s: NonNegFloat = 30.0
    idle_ttl_s: PosFloat | None = None
    restart: RestartConfig = RestartConfig()
    # How long a start takes, until one is measured (the eviction order's load cost).
    load_s: NonNegFloat | None = None
    # How to give the VRAM back without stopping the process (None: it cannot park).
    park: ParkConfig | None = None
    # Where the proxy forwards this service's requests (None: its health check's origin).
    upstream: str | None = None
    # A port of gpusm's own for this service alone (HOST:PORT), e.g. the well-known port
    # of the server it stands in for; every path on it is proxied to the upstream.
    listen: str | None = None
    # "none": that listener takes requests without a key (only on a loopback address).
    auth: Literal["token", "none"] = "token"
    # Paths (globs) whose requests never start the service: 503 while it is not running.
    ignore_paths: list[str] = []

    @model_validator(mode="after")
    def _upstream_is_a_url(self) -> ServiceConfig:
        if self.upstream is not None:
            parts = urlsplit(self.upstream)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"upstream must be a base URL like http://127.0.0.1:8000, got {self.upstream!r}"
                )
        return self

    @model_validator(mode="after")
    def _listener(self) -> ServiceConfig:
        if self.listen is not None:
            address = split_listen(self.listen)
            if address is None:
                raise ValueError(
                    f"listen must be HOST:PORT like 127.0.0.1:11434, got {self.listen!r}"
                )
            if self.auth == "none" and not is_loopback(address[0]):
                raise ValueError(
                    f"auth: none is allowed only on a loopback address (127.0.0.1, ::1, "
                    f"localhost), not on {address[0]!r}: anyone who reaches it could start "
                    "services"
                )
        elif self.auth == "none":
            raise ValueError("auth: none applies to the service's own listener: set listen too")
        for pattern in self.ignore_paths:
            if not pattern.startswith("/"):
                raise ValueError(f"ignore_paths entries are paths starting with /, got {pattern!r}")
        return self

    def ignores(self, path: str) -> bool:
        """Whether a request for ``path`` (the upstream's) must never start this service."""
        return any(fnmatchcase(path, pattern) for pattern in self.ignore_paths)

    @model_validator(mode="after")
    def _park_resolves(self) -> ServiceConfig:
        if self.park is not None:
            self.park.steps(self._health_url())  # a ValueError names what is missing
        return self

    @model_validator(mode="after")
    def _gpu_set(self) -> ServiceConfig:
        if isinstance(self.gpu, list):
            if not self.gpu:
                raise ValueError("gpu: [] allows no device; list at least one, or use auto")
            if len(set(self.gpu)) != len(self.gpu):
                raise ValueError(f"gpu lists a device twice: {self.gpu}")
            if self.gpu_count > len(self.gpu):
                raise ValueError(
                    f"gpu_count {self.gpu_count} is more than the {len(self.gpu)} devices "
                    f"gpu allows ({self.gpu})"
                )
        elif isinstance(self.gpu, int) and self.gpu_count > 1:
            raise ValueError(
                f"gpu_count {self.gpu_count} needs that many devices, but gpu pins one "
                f"({self.gpu}); use gpu: auto or a list"
            )
        return self

    def allowed_devices(self, count: int) -> list[int]:
        """The devices (of ``count`` on the host) this service may run on, in order."""
        if self.gpu == "auto":
            return list(range(count))
        if isinstance(self.gpu, int):
            return [self.gpu]
        return sorted(self.gpu)

    @property
    def pinned(self) -> int | None:
        """The one device it must use, if ``gpu`` names exactly one."""
        return self.gpu if isinstance(self.gpu, int) else None

    def upstream_url(self) -> str | None:
        """The base URL the proxy forwards to: ``upstream``, else the scheme, host and
        port of the health check (None when neither names one)."""
        url = self.upstream or self._health_url()
        if url is None:
            return None
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}" if self.upstream is None else url.rstrip("/")

    def park_steps(self) -> ParkSteps | None:
        """How this service parks and wakes, resolved; None if it cannot park."""
        return None if self.park is None else self.park.steps(self._health_url())

    def _health_url(self) -> str | None:
        if self.health.http is not None:
            return self.health.http
        if self.health.tcp is not None:
            return f"http://{self.health.tcp}"
        return None

    def published_ports(self) -> set[int]:
        """Host ports the runtime binds for this service (beyond its health check's)."""
        return set()

    def fingerprint(self) -> str:
        """A short hash of this service's config, recorded with each start: recovery
        compares it with the config it runs now to find instances that are stale."""
        return _short_hash(self.model_dump_json(warnings=False))

    def resolved(self, base: Path) -> ServiceConfig:
        """This service with its relative paths made absolute against ``base``."""
        return self

    def host_ports(self) -> set[int]:
        """Every host port this service claims (published ports and its health check)."""
        ports = self.published_ports()
        health = self.health.port()
        if health is not None:
            ports.add(health)
        return ports


class NativeServiceConfig(ServiceConfig):
    """A service run as a local process group: ``command`` in ``cwd`` with ``env``."""

    runtime: Literal["native"] = "native"
    command: Annotated[list[str], Field(min_length=1)]
    cwd: Path | None = None

    def resolved(self, base: Path) -> NativeServiceConfig:
        """``cwd`` made absolute against ``base``."""
        return self.model_copy(update={"cwd": _absolute(self.cwd, base)})


class DockerServiceConfig(ServiceConfig):
    """A service run as a Docker container of a locally available ``image``."""

    runtime: Literal["docker"] = "docker"
    image: Annotated[str, Field(min_length=1)]
    command: list[str] | None = None
    ports: list[str] = []
    volumes: list[str] = []
    gpus: Literal["all"] | list[NonNegInt] | None = None
    network_mode: str | None = None
    pid_mode: str | None = None
    init: bool = True
    pull: bool = False

    @model_validator(mode="after")
    def _port_specs(self) -> DockerServiceConfig:
        for spec in self.ports:
            if _host_port(spec) is None:
                raise ValueError(
                    f"ports entry {spec!r} must look like [ip:]host_port:container_port"
                )
        return self

    def published_ports(self) -> set[int]:
        """The host side of every ``ports`` entry."""
        return {p for p in (_host_port(s) for s in self.ports) if p is not None}

    def resolved(self, base: Path) -> DockerServiceConfig:
        """Host paths of ``volumes`` that start with ``.`` or ``~`` made absolute."""
        return self.model_copy(update={"volumes": [_resolve_volume(v, base) for v in self.volumes]})


def _runtime_of(raw: Any) -> str:
    if isinstance(raw, Mapping):
        return str(raw.get("runtime", "native"))
    return str(getattr(raw, "runtime", "native"))


# The runtimes a config may name; each entry is the model of its services.
SERVICE_KINDS: dict[str, type[ServiceConfig]] = {
    "native": NativeServiceConfig,
    "docker": DockerServiceConfig,
}

AnyService = Annotated[
    Annotated[NativeServiceConfig, Tag("native")] | Annotated[DockerServiceConfig, Tag("docker")],
    Discriminator(_runtime_of),
]


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _host_port(spec: str) -> int | None:
    parts = spec.split("/")[0].split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[-2:]):
        return None
    return int(parts[-2])


class PhaseConfig(_Strict):
    """A pipeline phase: the services it needs, and whether to stop everything else."""

    services: list[str] = []
    release: bool = False


class ApiKeyConfig(_Strict):
    """A key for the proxy: its token, the priority its requests get, what it may use."""

    name: Name
    token_file: Path
    # The priority of this key's proxied requests (None: the service's own).
    priority: int | None = None
    # The services it may reach through the proxy (None: every one).
    services: list[str] | None = None


class ApiConfig(_Strict):
    """Where ``gpusm serve`` listens and where its bearer token lives."""

    listen: str = "127.0.0.1:7723"
    token_file: Path | None = None
    # Keys of the proxy's clients; the daemon's own token is the key ``admin``.
    keys: list[ApiKeyConfig] = []
    # A worker over HTTP that is not heard from for this long loses its lease (null: never).
    lease_ttl_s: PosFloat | None = 60.0
    cors_origins: list[str] = []


class ProxyConfig(_Strict):
    """The proxy on ``gpusm serve``: how long a request may wait for its service."""

    # A request whose service is not healthy within this long is answered 503.
    wait_s: PosFloat = 300.0


class Config(_Strict):
    """The whole file, validated; paths are absolute once loaded."""

    state_dir: Path = Path("./state")
    database: str | None = None
    gpu: GpuConfig = GpuConfig()
    services: dict[Name, AnyService] = {}
    phases: dict[Name, PhaseConfig] = {}
    pipeline: list[str] = []
    api: ApiConfig = ApiConfig()
    # Model name (or glob) -> the service that serves it, for the proxy's /v1 and /api.
    models: dict[str, str] = {}
    proxy: ProxyConfig = ProxyConfig()
    # Webhooks: signed POSTs of chosen events, from the log, at least once (notify_config).
    notify: Webhooks = []
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _phase_shorthand(cls, raw: Any) -> Any:
        # `phase: [a, b]` is short for `phase: {services: [a, b]}`; a null phase needs nothing.
        if isinstance(raw, dict) and isinstance(raw.get("phases"), dict):
            phases = {}
            for name, value in raw["phases"].items():
                if value is None:
                    value = {"services": []}
                elif isinstance(value, list):
                    value = {"services": value}
                phases[name] = value
            raw = {**raw, "phases": phases}
        if isinstance(raw, dict) and isinstance(raw.get("services"), dict):
            raw = {
                **raw,
                "services": {
                    n: ({**s, "name": n} if isinstance(s, dict) else s)
                    for n, s in raw["services"].items()
                },
            }
        return raw

    def fingerprint(self) -> str:
        """A short hash of what the config says (not of where it was read from)."""
        # A runtime registered in code (not in the file format) serialises with a warning.
        return _short_hash(self.model_dump_json(exclude={"source"}, warnings=False))

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL of the event store (default: ``<state_dir>/gpusm.db``)."""
        return self.database or f"sqlite:///{self.state_dir / 'gpusm.db'}"

    @property
    def sim_dir(self) -> Path:
        """Folder of the simulated GPU (default: ``<state_dir>/simgpu``)."""
        return self.gpu.sim.dir or self.state_dir / "simgpu"

    def listens(self) -> list[str]:
        """The services' own listen addresses (``services.NAME.listen``)."""
        return [svc.listen for svc in self.services.values() if svc.listen is not None]

    @property
    def token_path(self) -> Path:
        """The API token file (default: ``<state_dir>/api-token``)."""
        return self.api.token_file or self.state_dir / "api-token"

    def service(self, name: str) -> ServiceConfig:
        """The named service; UnknownName if the file does not define it."""
        from gpusm.errors import UnknownName

        try:
            return self.services[name]
        except KeyError:
            raise UnknownName("service", name, list(self.services)) from None

    def phase(self, name: str) -> PhaseConfig:
        """The named phase; UnknownName if the file does not define it."""
        from gpusm.errors import UnknownName

        try:
            return self.phases[name]
        except KeyError:
            raise UnknownName("phase", name, list(self.phases)) from None


# ---------------------------------------------------------------- loading

_FIXES = {
    "extra_forbidden": "remove the key or correct its spelling",
    "missing": "add the key",
    "greater_than_equal": "use a value of zero or more",
    "greater_than": "use a value above zero",
    "int_parsing": "write a whole number",
    "int_type": "write a whole number",
    "float_parsing": "write a number",
    "literal_error": "use one of the allowed values",
    "string_pattern_mismatch": (
        "use letters, digits, '_', '-' or '.' (at most 63), starting with a letter or digit"
    ),
    "list_type": "write a list, e.g. [a, b]",
    "dict_type": "write a mapping of key: value",
    "model_type": "write a mapping of key: value",
    "bool_parsing": "write true or false",
}


def _config_error(exc: ValidationError, source: str) -> ConfigError:
    """The first validation error as one message naming the key and a fix."""
    err = exc.errors(include_url=False)[0]
    loc = tuple(err["loc"])
    kind = loc[2] if len(loc) > 2 and loc[0] == "services" else None
    if kind in SERVICE_KINDS:
        loc = loc[:2] + loc[3:]  # the runtime's tag is not a key of the file
    key = _key_path(loc)
    problem = str(err["msg"]).removeprefix("Value error, ")
    fix = _FIXES.get(str(err["type"]), "see the config reference in README.md")
    if err["type"] == "literal_error":
        fix = f"use {problem.removeprefix('Input should be ')}"
    elif err["type"] == "value_error":
        fix = problem
    elif err["type"] == "union_tag_invalid":
        problem = f"runtime must be one of {', '.join(SERVICE_KINDS)}"
        fix = f"use runtime: {' or runtime: '.join(SERVICE_KINDS)}"
        key += ".runtime"
    elif kind is not None and len(loc) == 3:
        problem, fix = _service_key_problem(str(kind), str(loc[2]), err["type"], problem, fix)
    return ConfigError(source, key, problem, fix)


def _service_key_problem(
    kind: str, field: str, error: str, problem: str, fix: str
) -> tuple[str, str]:
    """Say what a service of this runtime lacks or must not have, in the file's words."""
    if error == "missing" and field == "command" and kind == "native":
        return "a native service needs command: [program, args...]", "add command:"
    if error == "missing" and field == "image" and kind == "docker":
        return "a docker service needs image: NAME[:TAG]", "add image:"
    others = [k for k, model in SERVICE_KINDS.items() if field in model.model_fields]
    if error == "extra_forbidden" and others:
        where = " or ".join(others)
        return (
            f"{field} is for {where} services",
            f"remove it or set runtime: {others[0]}",
        )
    return problem, fix


def _key_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        # pydantic inserts the union member or validator name into the location.
        if isinstance(item, str) and (
            item.startswith(("function-", "literal[", "list[")) or item in ("int", "str")
        ):
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts)


def parse_config(
    raw: Mapping[str, Any], source: str = "<config>", base: Path | None = None
) -> Config:
    """Validate a mapping (as read from YAML); relative paths resolve against ``base``."""
    if not isinstance(raw, Mapping):
        raise ConfigError(
            source, "", "the file must hold a mapping of keys", "start from examples/sim-demo.yaml"
        )
    try:
        config = Config.model_validate(dict(raw))
    except ValidationError as exc:
        raise _config_error(exc, source) from None
    config = _resolve_paths(config, base or Path.cwd())
    _check_references(config, source)
    _check_addresses(config, source)
    return config.model_copy(update={"source": Path(source) if source != "<config>" else None})


def _absolute(p: Path | None, base: Path) -> Path | None:
    return None if p is None else (p if p.is_absolute() else (base / p).resolve())


def _resolve_paths(config: Config, base: Path) -> Config:
    services = {name: svc.resolved(base) for name, svc in config.services.items()}
    sim = config.gpu.sim.model_copy(update={"dir": _absolute(config.gpu.sim.dir, base)})
    token_file = _absolute(config.api.token_file, base)
    return config.model_copy(
        update={
            "state_dir": _absolute(config.state_dir, base),
            "gpu": config.gpu.model_copy(update={"sim": sim}),
            "services": services,
            "api": config.api.model_copy(
                update={
                    "token_file": token_file,
                    "keys": [
                        key.model_copy(update={"token_file": _absolute(key.token_file, base)})
                        for key in config.api.keys
                    ],
                }
            ),
            "notify": [hook.resolved(base) for hook in config.notify],
        }
    )


def _resolve_volume(spec: str, base: Path) -> str:
    host, sep, rest = spec.partition(":")
    if host.startswith((".", "~")):
        host = str((base / Path(host).expanduser()).resolve())
    return host + sep + rest


def _check_references(config: Config, source: str) -> None:
    for phase_name, phase in config.phases.items():
        for i, member in enumerate(phase.services):
            if member not in config.services:
                raise ConfigError(
                    source,
                    f"phases.{phase_name}.services[{i}]",
                    f"unknown service {member!r}",
                    f"define it under services: or use one of {sorted(config.services) or 'none'}",
                )
    for model, service in config.models.items():
        if service not in config.services:
            raise ConfigError(
                source,
                f"models.{model}",
                f"unknown service {service!r}",
                f"name a service under services: ({', '.join(sorted(config.services)) or 'none'})",
            )
    _check_keys(config, source)
    for i, phase_name in enumerate(config.pipeline):
        if phase_name not in config.phases:
            raise ConfigError(
                source,
                f"pipeline[{i}]",
                f"unknown phase {phase_name!r}",
                f"define it under phases: or use one of {sorted(config.phases) or 'none'}",
            )
    owners: dict[int, str] = {}
    for name, svc in config.services.items():
        for port in sorted(svc.host_ports()):
            if port in owners and owners[port] != name:
                raise ConfigError(
                    source,
                    f"services.{name}",
                    f"port {port} is also used by service {owners[port]!r}",
                    "give each service its own port",
                )
            owners[port] = name
    if config.gpu.backend == "sim":
        check_devices(config, len(config.gpu.sim.sizes), config.gpu.sim.sizes, source)


def check_devices(
    config: Config, count: int, sizes: list[int] | None = None, source: str | None = None
) -> None:
    """ConfigError for a service whose devices do not exist on a host of ``count``
    devices (of ``sizes`` MiB, when known), or that fits on none of them."""
    where = source or str(config.source or "<config>")
    reserve = config.gpu.reserve_mib
    for name, svc in config.services.items():
        missing = [d for d in _named_devices(svc) if d >= count]
        if missing:
            raise ConfigError(
                where,
                f"services.{name}.gpu",
                f"device {missing[0]} does not exist: this host has {count} (0-{count - 1})"
                if count > 1
                else f"device {missing[0]} does not exist: this host has one device (0)",
                "name a device the host has, or use gpu: auto",
            )
        allowed = svc.allowed_devices(count)
        requested = getattr(svc, "gpus", None)
        if isinstance(requested, list) and not set(allowed) <= set(requested):
            raise ConfigError(
                where,
                f"services.{name}.gpus",
                f"gpus {requested} does not give the container every device gpu: allows "
                f"({allowed}); it could be placed on a device it cannot see",
                f"set gpu: {requested if len(requested) > 1 else requested[0]}, "
                "or leave gpus: out (gpusm requests the devices it places it on)",
            )
        if svc.gpu_count > len(allowed):
            raise ConfigError(
                where,
                f"services.{name}.gpu_count",
                f"{svc.gpu_count} devices asked, but this host has {len(allowed)} it may use",
                "lower gpu_count, or allow more devices",
            )
        if sizes is None:
            continue
        fitting = [d for d in allowed if svc.vram_mib + reserve <= sizes[d]]
        if len(fitting) < svc.gpu_count:
            biggest = max(sizes[d] for d in allowed)
            raise ConfigError(
                where,
                f"services.{name}.vram_mib",
                f"{svc.vram_mib} MiB plus reserve_mib {reserve} exceeds "
                + (
                    f"the GPU's {biggest} MiB"
                    if len(allowed) == 1
                    else f"every device it may use (the biggest has {biggest} MiB)"
                ),
                "lower vram_mib or gpu.reserve_mib, or use a bigger GPU",
            )


def _check_keys(config: Config, source: str) -> None:
    seen = {"admin"}
    for i, key in enumerate(config.api.keys):
        if key.name in seen:
            raise ConfigError(
                source,
                f"api.keys[{i}].name",
                f"the key name {key.name!r} is taken"
                + (" (admin is the daemon's own token)" if key.name == "admin" else ""),
                "give each key a name of its own",
            )
        seen.add(key.name)
        for j, member in enumerate(key.services or []):
            if member not in config.services:
                raise ConfigError(
                    source,
                    f"api.keys[{i}].services[{j}]",
                    f"unknown service {member!r}",
                    f"name a service under services: ({', '.join(sorted(config.services))})",
                )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a listen address's) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _named_devices(svc: ServiceConfig) -> list[int]:
    if isinstance(svc.gpu, int):
        return [svc.gpu]
    return list(svc.gpu) if isinstance(svc.gpu, list) else []


def split_listen(value: str) -> tuple[str, int] | None:
    """``HOST:PORT`` or ``[IPv6]:PORT`` as (host, port); None if it is not that.

    The one syntax of a listen address: ``api.listen`` is checked with it, and
    :func:`gpusm.wire.parse_listen` (``gpusm serve --listen``, the client) parses with it.
    """
    text = value.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") if rest.startswith(":") else ""
    else:
        host, _, port = text.rpartition(":")
    if not host or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        return None
    return host, int(port)


def sqlite_file(url: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` URL; None if ``url`` names no SQLite file."""
    found = re.fullmatch(r"sqlite(?:\+\w+)?://[^/?]*/([^?]*)(?:\?.*)?", url, flags=re.DOTALL)
    if found is None or found.group(1) in ("", ":memory:"):
        return None
    return Path(found.group(1))


def _check_addresses(config: Config, source: str) -> None:
    """What ``gpusm serve`` and the event store would refuse later, refused now."""
    if split_listen(config.api.listen) is None:
        raise ConfigError(
            source,
            "api.listen",
            f"{config.api.listen!r} is not HOST:PORT",
            "write e.g. 127.0.0.1:7723 or [::1]:7723",
        )
    _check_listeners(config, source)
    if config.database is not None and sqlite_file(config.database) is None:
        raise ConfigError(
            source,
            "database",
            f"{config.database!r} is not the URL of a SQLite file",
            "write sqlite:///PATH/gpusm.db, or leave database out for <state_dir>/gpusm.db",
        )


def _check_listeners(config: Config, source: str) -> None:
    """A service's listener takes a port nothing else of gpusm's uses: not the API's,
    not another listener's, not a port a service itself serves on (a loop)."""
    api = split_listen(config.api.listen)
    taken: dict[int, str] = {api[1]: "api.listen"} if api is not None else {}
    for name, svc in config.services.items():
        for port in svc.host_ports():
            taken.setdefault(port, f"service {name}")
    for name, svc in config.services.items():
        address = split_listen(svc.listen) if svc.listen is not None else None
        if address is None:
            continue
        owner = taken.get(address[1])
        if owner is not None:
            raise ConfigError(
                source,
                f"services.{name}.listen",
                f"port {address[1]} is already used by {owner}",
                "run the service on an internal port (its health check and upstream) and "
                "give gpusm's listener the well-known one",
            )
        taken[address[1]] = f"services.{name}.listen"


def require_services(config: Config) -> Config:
    """``config`` if it defines at least one service; else a ConfigError saying how to add one."""
    if not config.services:
        raise _no_services(str(config.source or "<config>"))
    return config


def _no_services(source: str) -> ConfigError:
    return ConfigError(
        source, "", "the file defines no services", "add services: (see examples/sim-demo.yaml)"
    )


# ---------------------------------------------------------------- folders gpusm writes


def folder_problem(path: Path) -> str | None:
    """Why gpusm could not create and write the folder ``path``; None if it could.

    Only reads: ``path`` must be a writable folder, or the nearest folder above it that
    exists must be one (so that ``path`` can be created inside it).
    """
    if "\x00" in str(path):
        return "a path cannot contain a NUL character"
    probe = Path(os.path.abspath(path))
    try:
        while not probe.exists():
            if probe.parent == probe:  # pragma: no cover - the root always exists
                return "no folder above it exists"
            probe = probe.parent
        if not probe.is_dir():
            return f"{probe} is a file, not a folder"
        if not os.access(probe, os.W_OK | os.X_OK):
            return f"{probe} is not writable"
    except OSError as exc:
        return f"{exc.strerror or exc}"
    return None


def make_folder(
    path: Path, key: str = "state_dir", source: str | os.PathLike[str] | None = None
) -> Path:
    """Create the folder ``path`` (and its parents) unless it exists; returns it.

    An OS refusal (a file in the way, no permission, a read-only disk…) becomes a
    ConfigError naming ``key`` (and the config file ``source`` when known) and the fix.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as exc:
        why = folder_problem(path) or str(getattr(exc, "strerror", None) or exc)
        raise _folder_error(path, key, source, why) from None
    return path


def _folder_error(
    path: Path, key: str, source: str | os.PathLike[str] | None, why: str
) -> ConfigError:
    file, where = (str(source), key) if source is not None else (key, "")
    return ConfigError(
        file,
        where,
        f"cannot create or write the folder {path} ({why})",
        f"set {key} to a folder that gpusm may create and write",
    )


def check_folders(config: Config) -> None:
    """ConfigError for the first folder of ``config`` that gpusm could not create or write.

    The folders: ``state_dir``, the database's folder, ``gpu.sim.dir`` (simulated GPU
    only) and the API token's folder. Nothing is created.
    """
    folders: list[tuple[str, Path]] = [("state_dir", config.state_dir)]
    database = sqlite_file(config.database) if config.database else None
    if database is not None:
        folders.append(("database", database.parent))
    if config.gpu.backend == "sim":
        folders.append(("gpu.sim.dir", config.sim_dir))
    if config.api.token_file is not None:
        folders.append(("api.token_file", config.api.token_file.parent))
    for key, folder in folders:
        why = folder_problem(folder)
        if why is not None:
            raise _folder_error(folder, key, config.source, why)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config file."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            str(file),
            "",
            "file not found",
            "pass -c FILE, set GPUSM_CONFIG, or create ./gpusm.yaml",
        ) from None
    except OSError as exc:
        raise ConfigError(
            str(file), "", f"cannot read the file ({exc.strerror})", "check its permissions"
        ) from None
    except ValueError as exc:  # a NUL in the path, or bytes that are not UTF-8
        raise ConfigError(
            str(file), "", f"cannot read the file ({exc})", "give the path of a UTF-8 YAML file"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(
            str(file), "", f"YAML syntax error at {where}: {problem}", "fix the YAML syntax there"
        ) from None
    if raw is None or raw == {}:
        # An empty file is a mistake (a wrong path, an unsaved editor), not "no services".
        raise _no_services(str(file))
    return parse_config(raw, source=str(file), base=file.resolve().parent)


def to_yaml(doc: Mapping[str, Any]) -> str:
    """``doc`` as YAML, keys in the given order (for files that gpusm writes)."""
    return str(yaml.safe_dump(dict(doc), sort_keys=False))


def find_config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``--config`` if given, else ``$GPUSM_CONFIG``, else ``./gpusm.yaml``."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("GPUSM_CONFIG")
    return Path(env) if env else Path("gpusm.yaml")
