"""The dashboard at ``/ui`` and the timeline it draws, ``GET /gpu/timeline``.

``/ui`` is one static page (``static/index.html``, ``app.js``, ``app.css``) with uPlot
vendored beside it (``static/vendor/uplot-1.6.32/``, MIT, its licence kept): no build
step, nothing from another origin. The page and its files hold no data and load
without the token; every data call is made by the page's script. Reads (status,
events, the event stream, the timeline) need no token, like every GET of the API;
the buttons (start, stop, reset, release) send the token the user typed once, kept
in ``sessionStorage`` for the tab's life and sent only in ``Authorization``, never
in a URL. The event stream is read with ``fetch()`` (not ``EventSource``, which
cannot send headers), resuming with ``Last-Event-ID``.

Every ``/ui`` answer carries a strict Content-Security-Policy (this origin only, no
inline script or style, no framing), ``nosniff`` and ``no-referrer``.

``GET /gpu/timeline?since&until&device`` answers :class:`TimelineAnswer`: the
segments and markers of :func:`gpusm.timeline.read_timeline` over the event log (only
what the window needs is read), with the configured ``vram_mib`` of each service and
the devices' sizes from the GPU.
"""

import mimetypes
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from gpusm.api.problems import HttpProblem
from gpusm.api.routes import only_once, problem_responses, utc_query
from gpusm.api.state import ApiState
from gpusm.engine.coordinator import Coordinator
from gpusm.errors import UnknownName
from gpusm.ports import EventQuery
from gpusm.timeline import DeviceInfo, Timeline, read_timeline
from gpusm.wire import to_json

__all__ = [
    "CSP",
    "SECURITY_HEADERS",
    "TimelineAnswer",
    "build_ui_router",
    "static_files",
    "timeline_of",
]

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # The page and its script change together on upgrade: always ask.
    "Cache-Control": "no-cache",
}
_TIME: dict[str, Any] = {"format": "date-time"}
_MAX_DEVICE = 1023
_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}


@dataclass(frozen=True)
class TimelineAnswer:
    """The timeline, the newest seq in the log when it was read (to resume the event
    stream from), and the daemon's time then (UTC)."""

    timeline: Timeline
    head_seq: int
    now: datetime


def static_files() -> dict[str, tuple[bytes, str]]:
    """Every file under ``static/`` by its path there: (content, media type)."""
    found: dict[str, tuple[bytes, str]] = {}

    def walk(folder: Traversable, prefix: str) -> None:
        for entry in folder.iterdir():
            name = f"{prefix}{entry.name}"
            if entry.is_dir():
                walk(entry, f"{name}/")
            elif not entry.name.startswith("."):
                suffix = "." + entry.name.rpartition(".")[2]
                kind = _TYPES.get(suffix) or mimetypes.guess_type(entry.name)[0]
                if kind and kind.startswith("text/"):
                    kind += "; charset=utf-8"
                found[name] = (entry.read_bytes(), kind or "application/octet-stream")

    walk(resources.files("gpusm.api").joinpath("static"), "")
    return found


def timeline_of(
    coordinator: Coordinator,
    since: datetime | None,
    until: datetime | None,
    device: int | None,
) -> TimelineAnswer:
    """The timeline over ``coordinator``'s log (see the module docstring)."""
    now = datetime.now(UTC)
    status = coordinator.status()
    known = [d.index for d in status.devices]
    if device is not None and device not in known:
        raise UnknownName("device", str(device), [str(i) for i in known])
    head = coordinator.events(EventQuery(newest_first=True, limit=1))
    services = coordinator.config.services
    timeline = read_timeline(
        coordinator.events,
        services=list(services),
        now=now,
        since=since,
        until=until,
        declared={name: svc.vram_mib for name, svc in services.items()},
        device=device,
    )
    # The GPU knows its devices' sizes better than the log does, and lists idle ones.
    devices = tuple(
        DeviceInfo(d.index, d.total_mib)
        for d in status.devices
        if device is None or d.index == device
    )
    return TimelineAnswer(replace(timeline, devices=devices), head[0].seq if head else 0, now)


def build_ui_router(state: ApiState) -> APIRouter:
    """The dashboard's routes and ``GET /gpu/timeline``, bound to ``state``."""
    router = APIRouter()
    files = static_files()

    async def coordinator() -> Coordinator:
        found = state.coordinator
        if found is None:
            raise state.unavailable()
        return found

    Coord = Annotated[Coordinator, Depends(coordinator)]

    def page(name: str) -> Response:
        content, kind = files[name]
        return Response(content, media_type=kind, headers=SECURITY_HEADERS)

    @router.get("/ui", include_in_schema=False)
    @router.get("/ui/", include_in_schema=False)
    async def index() -> Response:
        return page("index.html")

    @router.get("/ui/static/{path:path}", include_in_schema=False)
    async def static(path: str) -> Response:
        if path not in files:
            raise HttpProblem("unknown-name", f"no dashboard file {path[:200]!r}", kind="file")
        return page(path)

    @router.get(
        "/gpu/timeline",
        response_model=TimelineAnswer,
        responses=problem_responses(421, 422, 500, 503, 404),
        dependencies=[only_once("since", "until", "device")],
    )
    def timeline(
        coord: Coord,
        since: Annotated[str | None, Query(max_length=64, json_schema_extra=_TIME)] = None,
        until: Annotated[str | None, Query(max_length=64, json_schema_extra=_TIME)] = None,
        device: Annotated[int | None, Query(ge=0, le=_MAX_DEVICE)] = None,
    ) -> Response:
        """Who held which device's VRAM when: one segment per service instance and
        device (start to stop, with what it held at each step) and markers for
        evictions, preemptions, crashes and failed starts, each with its event's
        reason. ``since``/``until`` clip (ISO 8601, no zone = UTC; ``since`` after
        ``until``: an empty window); ``device`` keeps one device (404 if the GPU has no
        such device)."""
        since_at, until_at = utc_query(since, "since"), utc_query(until, "until")
        # since after until is an empty window, as for GET /gpu/events (the dashboard
        # checks its own range before asking).
        answer = timeline_of(coord, since_at, until_at, device)
        return Response(to_json(answer), media_type="application/json")

    return router
