"""The proxy's model map: which service serves the model a request names.

``models:`` in the config maps model names and globs to services. A request names its
model in its JSON body (``"model": ...``), else in the query (``?model=``). Exact names
win; then the globs (:func:`fnmatch.fnmatchcase`) in the config's order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any

__all__ = [
    "is_pattern",
    "model_in_body",
    "model_list",
    "names_model_in_body",
    "route_model",
]

_GLOB = frozenset("*?[")
# Bodies of these types may name the model; any other (multipart uploads, audio) is
# streamed unread and routed by ``?model=`` only.
_READABLE = ("application/json", "text/plain", "application/x-www-form-urlencoded")


def is_pattern(name: str) -> bool:
    """Whether a key of ``models:`` is a glob rather than one model's name."""
    return not _GLOB.isdisjoint(name)


def route_model(models: Mapping[str, str], model: str) -> str | None:
    """The service that serves ``model``: its exact entry, else the first glob that
    matches it in config order; None when no entry does."""
    exact = models.get(model)
    if exact is not None and not is_pattern(model):
        return exact
    for pattern, service in models.items():
        if is_pattern(pattern) and fnmatchcase(model, pattern):
            return service
    return None


def names_model_in_body(content_type: str | None) -> bool:
    """Whether a body of this ``Content-Type`` is read to find the model (JSON, or no
    type at all: ``curl -d`` sends Ollama's JSON as a form)."""
    if not content_type:
        return True
    kind = content_type.partition(";")[0].strip().lower()
    return kind in _READABLE or kind.endswith("+json")


def model_in_body(body: bytes) -> str | None:
    """The ``model`` member of a JSON object body; None when there is none."""
    if not body.strip():
        return None
    try:
        doc: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    model = doc.get("model") if isinstance(doc, dict) else None
    return model if isinstance(model, str) and model else None


def model_list(models: Mapping[str, str]) -> dict[str, Any]:
    """``GET /v1/models``: the configured names in OpenAI's list shape (``owned_by``: the
    service); the globs, which are no model's id, under ``gpusm_patterns``."""
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": service}
            for name, service in models.items()
            if not is_pattern(name)
        ],
        "gpusm_patterns": [
            {"pattern": name, "service": service}
            for name, service in models.items()
            if is_pattern(name)
        ],
    }
