"""The VRAM timeline: folded from the event log (:mod:`.fold`) read window by window
(:mod:`.read`), drawn offline (:mod:`.render`).

The dashboard (``/ui``, ``GET /gpu/timeline``), ``gpusm timeline`` and ``gpusm demo``
share it. Pure: no I/O, no clock.
"""

from gpusm.timeline.fold import (
    MARKER_KINDS,
    TIMELINE_TYPES,
    DeviceInfo,
    Marker,
    Segment,
    Step,
    Timeline,
    build_timeline,
)
from gpusm.timeline.read import Reader, read_timeline
from gpusm.timeline.render import PALETTE, colours, render_html, render_svg

__all__ = [
    "MARKER_KINDS",
    "PALETTE",
    "TIMELINE_TYPES",
    "DeviceInfo",
    "Marker",
    "Reader",
    "Segment",
    "Step",
    "Timeline",
    "build_timeline",
    "colours",
    "read_timeline",
    "render_html",
    "render_svg",
]
