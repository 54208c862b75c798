"""The VRAM timeline drawn offline: an SVG in pure Python, or a self-contained HTML page.

The same picture as the dashboard's (``/ui``): per device, the VRAM each service held
as stacked step areas over time, markers for evictions, preemptions, crashes and failed
starts (hover: the event's reason, an SVG ``<title>``), and one lane per service with
each instance's start to stop. Colours follow the sorted service names, the same
palette as the dashboard's. Nothing is loaded from anywhere: the HTML page holds the
SVG inline and no script. Times are UTC.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from html import escape

from gpusm.timeline.fold import Marker, Segment, Timeline

__all__ = ["PALETTE", "colours", "render_html", "render_svg"]

# The dashboard's palette (gpusm/api/static/app.js), in the same order.
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)
_MARKER_COLOURS = {
    "evicted": "#d97706",
    "preempted": "#dc2626",
    "crashed": "#111827",
    "oom-refused": "#7c3aed",
}
_FAILURE_COLOUR = "#be123c"
# Seconds between time ticks: the first that gives at most ten.
_TICKS_S: tuple[int, ...] = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)
_TICKS_S += (7200, 10800, 21600, 43200, 86400, 172800, 604800)

WIDTH = 1100
_LEFT = 130  # room for the axis labels and lane names
_RIGHT = 36
_CHART_H = 220
_LANE_H = 16
_PANEL_GAP = 30


@dataclass(frozen=True)
class _Box:
    """Where one device's panel is drawn, and the time it spans."""

    top: float
    start: datetime
    end: datetime

    @property
    def span_s(self) -> float:
        return max((self.end - self.start).total_seconds(), 1e-3)

    def x(self, at: datetime) -> float:
        share = (at - self.start).total_seconds() / self.span_s
        return _LEFT + max(0.0, min(1.0, share)) * (WIDTH - _LEFT - _RIGHT)


def colours(names: Iterable[str]) -> dict[str, str]:
    """Each name's colour: by its place among the sorted names."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(sorted(set(names)))}


def _window(timeline: Timeline, now: datetime) -> tuple[datetime, datetime]:
    """The time the chart spans: the window asked for, narrowed to where the log has
    something (a report is about what happened, not about the quiet after it)."""
    moments = [s.start for s in timeline.segments] + [m.at for m in timeline.markers]
    ends = [s.end for s in timeline.segments] + [m.at for m in timeline.markers]
    end = timeline.until or (max(ends) if ends else now)
    begins = timeline.log_start or end - timedelta(minutes=1)
    start = max(timeline.since, begins) if timeline.since else begins
    start = min([start, *moments])
    if timeline.until is None and ends:
        end += (end - start) * 0.02  # a margin after the last thing
    if end <= start:
        end = start + timedelta(seconds=1)
    return start, end


def _held(segments: Sequence[Segment], name: str, at: datetime) -> int:
    value = 0
    for segment in segments:
        if segment.service != name or not segment.start <= at < segment.end:
            continue
        for step in segment.steps:
            if step.at <= at:
                value = step.reserved_mib
    return value


def _areas(
    segments: Sequence[Segment],
    names: Sequence[str],
    box: _Box,
    y: float,
    scale: float,
    palette: dict[str, str],
) -> list[str]:
    """One polygon per service: the band between the stack below it and its own top."""
    times = {box.start, box.end}
    for segment in segments:
        times.update(step.at for step in segment.steps)
        times.add(segment.end)
    xs = sorted(t for t in times if box.start <= t <= box.end)
    below = [0] * len(xs)
    shapes: list[str] = []
    for name in names:
        own = [_held(segments, name, t) for t in xs]
        top = [b + o for b, o in zip(below, own, strict=True)]
        if any(own):
            upper: list[str] = []
            for i, t in enumerate(xs):
                x = box.x(t)
                if i:
                    upper.append(f"{x:.1f},{y - top[i - 1] * scale:.1f}")
                upper.append(f"{x:.1f},{y - top[i] * scale:.1f}")
            lower: list[str] = []
            for i in range(len(xs) - 1, -1, -1):
                x = box.x(xs[i])
                lower.append(f"{x:.1f},{y - below[i] * scale:.1f}")
                if i:
                    lower.append(f"{x:.1f},{y - below[i - 1] * scale:.1f}")
            shapes.append(
                f'<polygon class="area" data-service="{escape(name)}" fill="{palette[name]}" '
                f'points="{" ".join(upper + lower)}"><title>{escape(name)}</title></polygon>'
            )
        below = top
    return shapes


def _tick_step(span_s: float) -> int:
    for step in _TICKS_S:
        if span_s / step <= 10:
            return step
    return _TICKS_S[-1]


def _time_label(at: datetime, step: int) -> str:
    if step >= 86400:
        return at.strftime("%m-%d")
    return at.strftime("%H:%M:%S" if step < 60 else "%H:%M")


def _axes(box: _Box, y: float, top_mib: int, scale: float) -> list[str]:
    parts: list[str] = []
    for i in range(5):
        value = round(top_mib * i / 4)
        py = y - value * scale
        parts.append(
            f'<line class="grid" x1="{_LEFT}" x2="{WIDTH - _RIGHT}" y1="{py:.1f}" y2="{py:.1f}"/>'
            f'<text class="label" x="{_LEFT - 6}" y="{py + 4:.1f}" text-anchor="end">'
            f"{value:,} MiB</text>"
        )
    step = _tick_step(box.span_s)
    epoch = box.start.timestamp()
    first = datetime.fromtimestamp((epoch // step + 1) * step, UTC)
    tick = first
    while tick <= box.end:
        px = box.x(tick)
        parts.append(
            f'<line class="grid" x1="{px:.1f}" x2="{px:.1f}" y1="{y - _CHART_H:.1f}" y2="{y}"/>'
            f'<text class="label" x="{px:.1f}" y="{y + 14}" text-anchor="middle">'
            f"{_time_label(tick, step)}</text>"
        )
        tick += timedelta(seconds=step)
    return parts


def _marker(marker: Marker, box: _Box, y: float) -> str:
    x = box.x(marker.at)
    colour = _MARKER_COLOURS.get(marker.kind, _FAILURE_COLOUR)
    when = marker.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    tip = f"{marker.type}: {marker.service} at {when} UTC (#{marker.seq})\n{marker.reason}"
    top = y - _CHART_H
    return (
        f'<g class="marker {escape(marker.kind)}" data-seq="{marker.seq}"><title>{escape(tip)}'
        f'</title><line x1="{x:.1f}" x2="{x:.1f}" y1="{top:.1f}" y2="{y}" stroke="{colour}" '
        f'stroke-dasharray="3 2"/><path d="M{x:.1f} {top - 6:.1f} l5 5 l-5 5 l-5 -5 z" '
        f'fill="{colour}"/></g>'
    )


def _lanes(
    segments: Sequence[Segment],
    names: Sequence[str],
    box: _Box,
    top: float,
    palette: dict[str, str],
) -> list[str]:
    parts: list[str] = []
    for row, name in enumerate(names):
        y = top + row * (_LANE_H + 3)
        parts.append(
            f'<text class="label" x="{_LEFT - 6}" y="{y + _LANE_H - 4}" text-anchor="end">'
            f"{escape(name)}</text>"
            f'<rect class="track" x="{_LEFT}" y="{y}" width="{WIDTH - _LEFT - _RIGHT}" '
            f'height="{_LANE_H}"/>'
        )
        for segment in (s for s in segments if s.service == name):
            x0, x1 = box.x(segment.start), box.x(segment.end)
            ended = "still running" if segment.open else segment.end_type
            tip = (
                f"{name} on GPU {segment.device}: {_clock(segment.start)} → "
                f"{_clock(segment.end)} UTC ({ended}), up to {segment.peak_mib:,} MiB"
            )
            parts.append(
                f'<rect class="segment" data-service="{escape(name)}" '
                f'data-start="{segment.start.isoformat()}" data-end="{segment.end.isoformat()}" '
                f'x="{x0:.1f}" y="{y + 1}" width="{max(x1 - x0, 1.5):.1f}" '
                f'height="{_LANE_H - 2}" fill="{palette[name]}"><title>{escape(tip)}</title></rect>'
            )
    return parts


def _clock(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3]


def _panel(
    timeline: Timeline,
    device: int,
    total_mib: int,
    top: float,
    now: datetime,
    palette: dict[str, str],
) -> tuple[list[str], float]:
    start, end = _window(timeline, now)
    box = _Box(top, start, end)
    segments = [s for s in timeline.segments if s.device == device]
    markers = [m for m in timeline.markers if m.device in (device, None)]
    names = [n for n in palette if any(s.service == n for s in segments)]
    peak = 0
    if segments:
        peak = max(
            sum(_held(segments, n, t) for n in names)
            for t in {s.start for s in segments} | {st.at for s in segments for st in s.steps}
        )
    top_mib = max(total_mib, peak, 1)
    scale = _CHART_H / top_mib
    legend_y = top + 36
    chart_bottom = legend_y + 14 + _CHART_H
    head = (
        f'<text class="title" x="{_LEFT}" y="{top + 18}">GPU {device} · {total_mib:,} MiB · '
        f"{len(segments)} segment(s), {len(markers)} marker(s)</text>"
    )
    parts = [f'<g class="device" data-device="{device}">', head]
    x = float(_LEFT)
    for name in names:
        parts.append(
            f'<rect x="{x:.0f}" y="{legend_y - 9}" width="10" height="10" fill="{palette[name]}"/>'
            f'<text class="label" x="{x + 14:.0f}" y="{legend_y}">{escape(name)}</text>'
        )
        x += 24 + 7 * len(name)
    parts += _axes(box, chart_bottom, top_mib, scale)
    parts += _areas(segments, names, box, chart_bottom, scale, palette)
    parts.append(
        f'<line class="axis" x1="{_LEFT}" x2="{WIDTH - _RIGHT}" y1="{chart_bottom}" '
        f'y2="{chart_bottom}"/>'
    )
    parts += [_marker(m, box, chart_bottom) for m in markers]
    lanes_top = chart_bottom + 26
    parts += _lanes(segments, names, box, lanes_top, palette)
    if not segments and not markers:
        parts.append(
            f'<text class="label" x="{_LEFT + 10}" y="{chart_bottom - _CHART_H / 2}">'
            "nothing held VRAM on this device in this window</text>"
        )
    parts.append("</g>")
    return parts, lanes_top + len(names) * (_LANE_H + 3) + _PANEL_GAP


_STYLE = (
    "text{font:12px system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;fill:#0f172a}"
    ".title{font-weight:600;font-size:14px}.label{fill:#475569}"
    ".grid{stroke:#e2e8f0}.axis{stroke:#64748b}.track{fill:#f1f5f9}"
    ".area{stroke:none}.segment{opacity:.9}"
)


def render_svg(
    timeline: Timeline, *, now: datetime, names: Iterable[str] = (), title: str = ""
) -> str:
    """The timeline as a standalone SVG document. ``names`` are the configured services
    (they fix the colours, as on the dashboard); ``now`` ends a window without ``until``."""
    palette = colours([*names, *timeline.services])
    start, end = _window(timeline, now)
    heading = title or (
        f"gpusm VRAM timeline, {start.strftime('%Y-%m-%d %H:%M:%S')} to "
        f"{end.strftime('%Y-%m-%d %H:%M:%S')} UTC"
    )
    body: list[str] = [f'<text class="title" x="{_LEFT}" y="22">{escape(heading)}</text>']
    top = 34.0
    devices = timeline.devices or ()
    for device in devices:
        parts, top = _panel(timeline, device.index, device.total_mib, top, now, palette)
        body += parts
    if not devices:
        body.append(
            f'<text class="label" x="{_LEFT}" y="{top + 20}">no events in this window</text>'
        )
        top += 40
    height = round(top)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{escape(heading)}">'
        f"<style>{_STYLE}</style>"
        f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>' + "".join(body) + "</svg>\n"
    )


def render_html(
    timeline: Timeline, *, now: datetime, names: Iterable[str] = (), title: str = ""
) -> str:
    """A self-contained page with :func:`render_svg`'s chart and a table of its markers:
    no script, nothing loaded from anywhere."""
    svg = render_svg(timeline, now=now, names=names, title=title)
    rows = "".join(
        f"<tr><td>{escape(m.at.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S.%f')[:-3])}</td>"
        f"<td>{m.seq}</td><td>{escape(m.service)}</td><td>{escape(m.type)}</td>"
        f"<td>{escape(m.reason)}</td></tr>"
        for m in timeline.markers
    )
    table = (
        "<table><thead><tr><th>at (UTC)</th><th>seq</th><th>service</th><th>event</th>"
        f"<th>reason</th></tr></thead><tbody>{rows}</tbody></table>"
        if rows
        else "<p>No evictions, preemptions, crashes or failed starts in this window.</p>"
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'\">"
        f"<title>{escape(title or 'gpusm VRAM timeline')}</title><style>"
        "body{font:14px system-ui,sans-serif;margin:16px;color:#0f172a}"
        "table{border-collapse:collapse;margin-top:12px}td,th{border-bottom:1px solid #e2e8f0;"
        "padding:3px 8px;text-align:left;vertical-align:top}th{color:#64748b}"
        f"</style></head><body>{svg}{table}</body></html>\n"
    )
