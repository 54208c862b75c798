"""The Docker runtime: each service instance is one labelled container.

This is the only module that imports the ``docker`` SDK; every docker or transport
error is translated here into :class:`~gpusm.errors.ServiceRuntimeError` and its
subclasses, naming the service and a fix. Containers get the labels
``gpusm.service``/``gpusm.instance`` (the marker recovery looks for), restart policy
``no`` (the coordinator owns restarts), published ports on 127.0.0.1 unless the spec
names an address, and the name ``gpusm-<service>-<instance[:8]>``. Images are never
pulled unless the service says ``pull: true``.

Devices: given a :class:`~gpusm.ports.Placement`, the container gets the same
``CUDA_VISIBLE_DEVICES``/``CUDA_DEVICE_ORDER`` and ``{gpu}``/``{gpus}`` placeholders (in
``command`` and ``env`` values) as a native process (see :mod:`gpusm.runtimes.native`).
Which GPUs the engine hands the container:

- a service's own ``gpus:`` (``all`` or a list of indices) keeps its meaning and wins: the
  operator asked for exactly that device request;
- else, when the runtime is built with ``gpu_requests=True`` (the real, NVML backend), an
  NVIDIA device request for the placed devices: their UUIDs, else their indices;
- else none: the simulated GPU needs no device, and an engine without the NVIDIA runtime
  could not start a container that asks for one.

Inside a container that sees only some devices they are numbered from 0, so when the
placement has no UUIDs ``CUDA_VISIBLE_DEVICES`` names each placed device by its position
among those the container sees; UUIDs mean the same inside and out.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit

import docker
import docker.errors
from docker.types import DeviceRequest

from gpusm import procs
from gpusm.clock import SystemClock
from gpusm.config import DockerServiceConfig, ServiceConfig
from gpusm.errors import ServiceRuntimeError, ServiceStartFailed, ServiceStopFailed
from gpusm.ports import Clock, Handle, Placement, Runtime, StopResult
from gpusm.runtimes.native import attribute_by_lineage, device_env, device_indices, fill_devices

__all__ = ["LABEL_INSTANCE", "LABEL_SERVICE", "RUNTIME_ENV", "DockerRuntime", "container_name"]

LABEL_SERVICE = "gpusm.service"
LABEL_INSTANCE = "gpusm.instance"
RUNTIME_ENV = "GPUSM_RUNTIME"
# How long a container may take to vanish after SIGKILL before the stop counts as failed.
_KILL_WAIT_S = 10.0
_DEFAULT_HOST = "unix:///var/run/docker.sock"
# Two readings of one process's create time agree far closer than this.
_CREATE_TIME_TOLERANCE_S = 0.01
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "0.0.0.0", "::1", "::"}


def container_name(service: str, instance: str) -> str:
    """``gpusm-<service>-<instance[:8]>``, keeping only characters Docker allows."""
    short = re.sub(r"[^A-Za-z0-9_.-]", "", instance)[:8] or "x"
    return f"gpusm-{service}-{short}"


class DockerRuntime:
    """Runs services as containers on one Docker engine (see the module docstring).

    ``client_factory`` makes the SDK client (default: ``docker.from_env()``, which honours
    ``DOCKER_HOST``); it is called lazily and again after a failure, so an engine that
    comes up later is found. ``extra_env`` is added to every container's environment;
    a service's own ``env`` wins over it, and ``GPUSM_SERVICE``/``GPUSM_INSTANCE`` win
    over both. ``extra_labels`` go on every container this runtime creates, and
    ``find_orphans`` then reports only containers that carry all of them (so runs side by
    side, e.g. tests, see only their own). ``gpu_requests`` says the GPUs are real: a
    placed container then gets an NVIDIA device request for its devices (module docstring).
    """

    def __init__(
        self,
        client_factory: Callable[[], docker.DockerClient] | None = None,
        *,
        default_bind_ip: str = "127.0.0.1",
        extra_env: Mapping[str, str] | None = None,
        extra_labels: Mapping[str, str] | None = None,
        clock: Clock | None = None,
        kind: str = "docker",
        gpu_requests: bool = False,
    ) -> None:
        self.kind = kind
        self.gpu_requests = gpu_requests
        self._factory: Callable[[], Any] = client_factory or _client_from_env
        self._client: Any = None
        self._bind_ip = default_bind_ip
        self._extra_env = dict(extra_env or {})
        self._extra_labels = dict(extra_labels or {})
        self._clock: Clock = clock or SystemClock()

    # ------------------------------------------------------------ Runtime port
    def start(
        self, service: ServiceConfig, instance: str, placement: Placement | None = None
    ) -> Handle:
        """Create and start the container on ``placement``'s devices; ServiceStartFailed
        (with the fix) if it cannot.

        Host ports the service needs (published TCP ports, and a local health port) must
        be free first. With ``pull: true`` a missing image is pulled; a local one is used.
        """
        name = service.name
        container = self._create(service, instance, placement)
        try:
            container.start()
            container.reload()
        except (docker.errors.DockerException, OSError) as exc:
            self._discard(container)
            self._fail(exc, name, ServiceStartFailed, "start", cname=str(container.name))
        pid = int(container.attrs["State"].get("Pid") or 0) or None
        return Handle(
            service=name,
            instance=instance,
            pid=pid,
            create_time=procs.create_time(pid),
            container_id=str(container.id),
            kind=self.kind,
        )

    def create(
        self, service: ServiceConfig, instance: str, placement: Placement | None = None
    ) -> str:
        """Create, and do not start, the container ``start`` would start; its id.

        The very path ``start`` takes (checks, settings, pull), for looking at what a
        container would get (e.g. a device request) where it could not run. The caller
        removes it.
        """
        return str(self._create(service, instance, placement).id)

    def _create(self, service: ServiceConfig, instance: str, placement: Placement | None) -> Any:
        name = service.name
        if not isinstance(service, DockerServiceConfig):
            raise ServiceStartFailed(
                name,
                f"it is a {service.runtime!r} service, not a docker one; the runtime "
                f"{self.kind!r} runs only services with runtime: docker",
            )
        image = service.image or ""
        kwargs = self._create_kwargs(service, instance, placement)
        self._check_ports_free(service)
        client = self._connect(name, ServiceStartFailed)
        try:
            try:
                return client.containers.create(image, **kwargs)
            except docker.errors.ImageNotFound:
                if not service.pull:
                    raise
                self._pull(client, service)
                return client.containers.create(image, **kwargs)
        except (docker.errors.DockerException, OSError) as exc:
            self._fail(exc, name, ServiceStartFailed, "start", image=image, cname=kwargs["name"])

    def is_alive(self, handle: Handle) -> bool:
        """Whether the handle's container runs, still with the main process the handle names.

        A container restarted behind gpusm's back has a new main pid (or create time) and
        so is not this instance any more.
        """
        container = self._find(handle, ServiceRuntimeError)
        return container is not None and _runs_instance(container, handle)

    def stop(self, handle: Handle, grace_s: float) -> StopResult:
        """Send the image's stop signal (SIGTERM by default), SIGKILL after ``grace_s``, remove.

        ``escalated`` is true exactly when the container still ran at the end of the grace
        period and had to be killed. A container that is gone or already exited gives
        ``already_dead=True`` (an exited one is removed).
        """
        began = self._clock.monotonic()
        container = self._find(handle, ServiceStopFailed)
        if container is None:
            return StopResult(duration_s=0.0, escalated=False, already_dead=True)
        escalated = False
        already_dead = not container.attrs["State"].get("Running")
        if not already_dead and not _runs_instance(container, handle):
            # Another incarnation runs under this container: not ours to stop.
            return StopResult(duration_s=0.0, escalated=False, already_dead=True)
        if not already_dead:
            signal = container.attrs["Config"].get("StopSignal") or "SIGTERM"
            self._signal(container, handle, signal)
            if not self._wait_exit(container, handle, began + grace_s):
                # still running at the end of the grace period -> SIGKILL
                escalated = True
                self._signal(container, handle, "SIGKILL")
                if not self._wait_exit(container, handle, self._clock.monotonic() + _KILL_WAIT_S):
                    raise ServiceStopFailed(
                        handle.service,
                        f"container {container.name} still runs {_KILL_WAIT_S:.0f}s after "
                        "SIGKILL; check the Docker engine (`docker ps`, dockerd logs)",
                    )
        self._remove(container, handle, force=True)
        return StopResult(
            duration_s=self._clock.monotonic() - began,
            escalated=escalated,
            already_dead=already_dead,
        )

    def attribute(self, pids: Collection[int], handles: Sequence[Handle]) -> dict[int, Handle]:
        """Host pids carrying an instance's marker, or descending from the container's
        init process; asks the Docker engine nothing."""
        return attribute_by_lineage(pids, handles)

    def pids_of(self, handle: Handle) -> set[int]:
        """Host pids of every process in the container (empty once it is not running)."""
        container = self._find(handle, ServiceRuntimeError)
        if container is None or not _runs_instance(container, handle):
            return set()
        try:
            # `docker top` lists the container's cgroup, which catches re-parented orphans.
            top = container.top(ps_args="-eo pid")
            return {int(row[0]) for row in top.get("Processes") or []}
        except docker.errors.APIError:
            # The engine runs `ps` on the host for top; without it, walk the process tree.
            return procs.tree_pids(int(container.attrs["State"].get("Pid") or 0))
        except OSError as exc:
            self._fail(exc, handle.service, ServiceRuntimeError, "list processes of")

    def find_orphans(self) -> list[Handle]:
        """Every container that carries both gpusm labels, running or exited.

        Exited ones are listed too so that recovery can remove them; containers without
        our labels are never returned (and so never touched).
        """
        client = self._connect("*", ServiceRuntimeError)
        try:
            wanted = [LABEL_SERVICE, *(f"{k}={v}" for k, v in self._extra_labels.items())]
            found = client.containers.list(all=True, filters={"label": wanted})
        except (docker.errors.DockerException, OSError) as exc:
            self._fail(exc, "*", ServiceRuntimeError, "list the containers of")
        handles = []
        for container in found:
            labels = container.labels or {}
            if LABEL_SERVICE not in labels or LABEL_INSTANCE not in labels:
                continue
            pid = int(container.attrs["State"].get("Pid") or 0) or None
            handles.append(
                Handle(
                    service=labels[LABEL_SERVICE],
                    instance=labels[LABEL_INSTANCE],
                    pid=pid,
                    create_time=procs.create_time(pid),
                    container_id=str(container.id),
                    kind=self.kind,
                )
            )
        return handles

    # ------------------------------------------------------------ extras
    def remove(self, handle: Handle) -> None:
        """Remove an exited container; a missing one is fine, a running one is an error."""
        container = self._find(handle, ServiceRuntimeError)
        if container is None:
            return
        if container.attrs["State"].get("Running"):
            raise ServiceRuntimeError(
                handle.service, f"container {container.name} is still running; stop it first"
            )
        self._remove(container, handle, force=False)

    def signal(self, handle: Handle, name: str) -> None:
        """Send the signal ``name`` to the container's main process (``docker kill -s``)."""
        container = self._find(handle, ServiceRuntimeError)
        if container is None or not container.attrs["State"].get("Running"):
            raise ServiceRuntimeError(handle.service, f"cannot send {name}: it is not running")
        try:
            container.kill(signal=name)
        except (docker.errors.DockerException, OSError) as exc:
            self._fail(exc, handle.service, ServiceRuntimeError, f"send {name} to")

    def exit_code(self, handle: Handle) -> int | None:
        """The container's exit status once it stopped running; never raises.

        None while it runs, once it is removed (``stop`` removes it), or when the
        engine cannot be asked. Docker reports death by a signal as 128 + the signal
        number, like a shell, and cannot tell it from a program exiting with that code,
        so the status is returned as Docker gives it (never negative).
        """
        try:
            container = self._find(handle, ServiceRuntimeError)
        except ServiceRuntimeError:
            return None
        if container is None:
            return None
        state = container.attrs["State"]
        if state.get("Running"):
            return None
        code = state.get("ExitCode")
        return None if code is None else int(code)

    def log_tail(self, handle: Handle, lines: int = 20) -> str:
        """The last ``lines`` lines of the container's output; never raises.

        "" once the container is removed, when it wrote nothing, or when the engine
        cannot be asked.
        """
        # Often used to decorate another error: never replace that one with a new one.
        if lines <= 0:
            return ""
        try:
            container = self._find(handle, ServiceRuntimeError)
            raw = b"" if container is None else container.logs(tail=lines)
        except (ServiceRuntimeError, docker.errors.DockerException, OSError):
            return ""
        return "\n".join(bytes(raw).decode("utf-8", "replace").splitlines()[-lines:])

    def close(self) -> None:
        """Close the engine connection; idempotent. A later call reconnects."""
        self._drop_client()

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(docker.errors.DockerException, OSError):
                client.close()

    # ------------------------------------------------------------ helpers
    def _connect(self, service: str, error: type[ServiceRuntimeError]) -> Any:
        if self._client is None:
            try:
                self._client = self._factory()
            except (docker.errors.DockerException, OSError) as exc:
                raise error(service, self._unreachable(None)) from exc
        return self._client

    def _unreachable(self, client: Any) -> str:
        where = str(getattr(getattr(client, "api", None), "base_url", None) or "")
        if not where or where.startswith("http+docker"):
            # The SDK's placeholder for a local socket; name what the user can check.
            where = os.environ.get("DOCKER_HOST") or _DEFAULT_HOST
        return f"cannot reach the Docker engine at {where}; start dockerd or check DOCKER_HOST"

    def _find(self, handle: Handle, error: type[ServiceRuntimeError]) -> Any:
        """The handle's container (by id, else by name), or None if there is none.

        A container without this handle's labels counts as none: gpusm never touches a
        container it did not label, whatever its name.
        """
        client = self._connect(handle.service, error)
        key = handle.container_id or container_name(handle.service, handle.instance)
        try:
            container = client.containers.get(key)
        except docker.errors.NotFound:
            return None
        except (docker.errors.DockerException, OSError) as exc:
            self._fail(exc, handle.service, error, "inspect the container of")
        labels = container.labels or {}
        mine = (labels.get(LABEL_SERVICE), labels.get(LABEL_INSTANCE))
        return container if mine == (handle.service, handle.instance) else None

    def _create_kwargs(
        self, service: DockerServiceConfig, instance: str, placement: Placement | None = None
    ) -> dict[str, Any]:
        indices = device_indices(service, placement)
        requests, seen = self._device_requests(service, placement)
        visible = None if placement is None else _visible_inside(placement, seen)
        env = {
            **self._extra_env,
            **{key: fill_devices(value, indices) for key, value in service.env.items()},
            # Over the service's own env on purpose: see native.device_env.
            **device_env(placement, visible),
            "GPUSM_SERVICE": service.name,
            "GPUSM_INSTANCE": instance,
            # A container's processes are host processes too; this tells the native
            # runtime's orphan scan that Docker owns them.
            RUNTIME_ENV: "docker",
        }
        kwargs: dict[str, Any] = {
            "name": container_name(service.name, instance),
            "command": [fill_devices(arg, indices) for arg in service.command]
            if service.command
            else None,
            "environment": env,
            "labels": {
                **self._extra_labels,
                LABEL_SERVICE: service.name,
                LABEL_INSTANCE: instance,
            },
            "ports": self._port_bindings(service.ports),
            "volumes": [_volume(service.name, v) for v in service.volumes],
            "init": service.init,
            "restart_policy": {"Name": "no"},
            "detach": True,
        }
        if service.network_mode:
            kwargs["network_mode"] = service.network_mode
        if service.pid_mode:
            kwargs["pid_mode"] = service.pid_mode
        if requests:
            kwargs["device_requests"] = requests
        return kwargs

    def _device_requests(
        self, service: DockerServiceConfig, placement: Placement | None
    ) -> tuple[list[DeviceRequest], list[int] | None]:
        """The device requests (module docstring), and the indices of the devices the
        container will see (None: all of them, or not known)."""
        if service.gpus == "all":
            return [DeviceRequest(driver="nvidia", count=-1, capabilities=[["gpu"]])], None
        if service.gpus:
            # The operator's explicit choice keeps its meaning, placement or not.
            ids = [str(i) for i in service.gpus]
            request = DeviceRequest(driver="nvidia", device_ids=ids, capabilities=[["gpu"]])
            return [request], list(service.gpus)
        if self.gpu_requests and placement is not None:
            if _uuids_known(placement):
                ids = list(placement.uuids)
            else:
                ids = [str(i) for i in placement.indices]
            request = DeviceRequest(driver="nvidia", device_ids=ids, capabilities=[["gpu"]])
            return [request], list(placement.indices)
        return [], None

    def _port_bindings(self, specs: list[str]) -> dict[str, list[tuple[str, int]]]:
        bindings: dict[str, list[tuple[str, int]]] = {}
        for spec in specs:
            ip, host, container, proto = _parse_port(spec, self._bind_ip)
            bindings.setdefault(f"{container}/{proto}", []).append((ip, host))
        return bindings

    def _check_ports_free(self, service: DockerServiceConfig) -> None:
        """Fail before creating anything if a host port the service needs is taken.

        A busy health port is dangerous even with host networking: the check would talk
        to the other program and call this service healthy.
        """
        wanted = [
            (ip, host)
            for ip, host, _, proto in (_parse_port(s, self._bind_ip) for s in service.ports)
            if proto == "tcp"
        ]
        health = service.health
        target = health.http and urlsplit(health.http).hostname
        if health.tcp:
            target = health.tcp.rpartition(":")[0].strip("[]")
        port = health.port()
        if port is not None and target in _LOCAL_HOSTS:
            wanted.append(("127.0.0.1", port))
        for ip, host in dict.fromkeys(wanted):
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                # REUSEADDR so a port left in TIME_WAIT by the previous instance counts as free.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((ip, host))
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        raise ServiceStartFailed(
                            service.name,
                            f"port {ip}:{host} is already in use by another program; stop "
                            "it or give this service another port",
                        ) from None
                    if exc.errno == errno.EADDRNOTAVAIL:
                        raise ServiceStartFailed(
                            service.name,
                            f"address {ip} (ports entry) is not an address of this host; "
                            "use 127.0.0.1 or one of the host's addresses",
                        ) from None
                    # Anything else (e.g. a privileged port) is for the engine to judge.

    def _pull(self, client: Any, service: DockerServiceConfig) -> None:
        try:
            client.images.pull(service.image)
        except (docker.errors.DockerException, OSError) as exc:
            raise ServiceStartFailed(
                service.name,
                f"could not pull image {service.image} ({_explain(exc)}); check the name, "
                "registry access and credentials (`docker login`)",
            ) from exc

    def _signal(self, container: Any, handle: Handle, signal: str) -> None:
        try:
            container.kill(signal=signal)
        except docker.errors.APIError as exc:
            # 409: it exited between our look and the signal; the wait below sees that.
            if exc.status_code not in (404, 409):
                self._fail(exc, handle.service, ServiceStopFailed, f"send {signal} to")
        except OSError as exc:
            self._fail(exc, handle.service, ServiceStopFailed, f"send {signal} to")

    def _wait_exit(self, container: Any, handle: Handle, deadline: float) -> bool:
        """Poll until the container stops running (True) or ``deadline`` passes (False)."""
        delay = 0.02
        while True:
            try:
                container.reload()
            except docker.errors.NotFound:
                return True
            except (docker.errors.DockerException, OSError) as exc:
                self._fail(exc, handle.service, ServiceStopFailed, "watch the container of")
            if not container.attrs["State"].get("Running"):
                return True
            left = deadline - self._clock.monotonic()
            if left <= 0:
                return False
            self._clock.sleep(min(delay, left))
            delay = min(delay * 2, 0.2)

    def _remove(self, container: Any, handle: Handle, *, force: bool) -> None:
        try:
            container.remove(force=force, v=True)
        except docker.errors.NotFound:
            pass  # removed by someone else (or --rm): the goal is reached
        except docker.errors.APIError as exc:
            # 409 "removal already in progress" is someone else reaching the same goal.
            if exc.status_code != 409 or "in progress" not in _explain(exc):
                self._fail(exc, handle.service, ServiceStopFailed, "remove the container of")
        except OSError as exc:
            self._fail(exc, handle.service, ServiceStopFailed, "remove the container of")

    def _discard(self, container: Any) -> None:
        # Best effort while reporting the real failure.
        with contextlib.suppress(docker.errors.DockerException, OSError):
            container.remove(force=True, v=True)

    def _fail(
        self,
        exc: BaseException,
        service: str,
        error: type[ServiceRuntimeError],
        action: str,
        *,
        image: str = "",
        cname: str = "",
    ) -> NoReturn:
        """Raise ``error`` with a message saying what went wrong and how to fix it."""
        text = _explain(exc)
        low = text.lower()
        status = getattr(exc, "status_code", None)
        if isinstance(exc, docker.errors.ImageNotFound) and image:
            msg = f"image {image} not found locally; build it or set pull: true"
        elif not isinstance(exc, docker.errors.APIError):
            # No HTTP answer at all (APIError is an OSError too, so this test comes second).
            msg = self._unreachable(self._client)
            self._drop_client()  # reconnect next time
        elif status == 409 and cname and "already in use" in low:
            msg = (
                f"a container named {cname} already exists (left from an earlier run?); "
                f"remove it with `docker rm -f {cname}`"
            )
        elif "port is already allocated" in low or "address already in use" in low:
            msg = f"a host port is already in use ({text}); free it or change ports"
        else:
            msg = f"Docker could not {action} the service: {text}"
        raise error(service, msg) from exc


def _client_from_env() -> Any:
    """``docker.from_env()``, after checking that a local engine socket answers at all.

    The SDK leaks a socket when a unix-socket connect fails; checking first keeps the
    common "dockerd is not running" case clean and gives the same clear error.
    """
    host = os.environ.get("DOCKER_HOST") or _DEFAULT_HOST
    if host.startswith("unix://"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5.0)
            sock.connect(host.removeprefix("unix://"))  # OSError -> "cannot reach"
    return docker.from_env()


def _uuids_known(placement: Placement) -> bool:
    """Whether ``CUDA_VISIBLE_DEVICES`` names the placed devices by UUID."""
    return bool(placement.uuids) and all(placement.uuids)


def _visible_inside(placement: Placement, seen: list[int] | None) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` in a container that sees only the devices ``seen``: each
    placed device by its position among them (the container numbers them from 0, in bus
    order). None (the placement's own value) when UUIDs name them, or all are seen."""
    if _uuids_known(placement) or seen is None or not set(placement.indices) <= set(seen):
        return None
    order = sorted(seen)
    return ",".join(str(order.index(i)) for i in placement.indices)


def _parse_port(spec: str, default_ip: str) -> tuple[str, int, int, str]:
    """``[ip:]host:container[/proto]`` -> (ip, host, container, proto); validated by config."""
    body, _, proto = spec.partition("/")
    parts = body.rsplit(":", 2)
    ip = parts[0].strip("[]") if len(parts) == 3 else default_ip
    return ip, int(parts[-2]), int(parts[-1]), proto or "tcp"


def _volume(service: str, spec: str) -> str:
    """Check ``host:container[:ro|rw]``; the SDK takes it as is."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]) or parts[2:] not in ([], ["ro"], ["rw"]):
        raise ServiceStartFailed(
            service, f"volumes entry {spec!r} must look like /host/path:/container/path[:ro]"
        )
    return spec


def _runs_instance(container: Any, handle: Handle) -> bool:
    """Running, and (when the handle knows them) with the handle's main pid and create time."""
    state = container.attrs["State"]
    if not state.get("Running"):
        return False
    if handle.pid is None or handle.create_time is None:
        return True
    pid = int(state.get("Pid") or 0)
    now = procs.create_time(pid or None)
    # `now` is None when the engine's pids are not visible here (a remote engine).
    return pid == handle.pid and (
        now is None or procs.same_create_time(now, handle.create_time, _CREATE_TIME_TOLERANCE_S)
    )


def _explain(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc)


_: type[Runtime] = DockerRuntime  # mypy checks that it implements the port
