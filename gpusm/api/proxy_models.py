"""The proxy's model map: which service serves the model a request names.

``models:`` in the config maps model names and globs to services. A request names its
model in its JSON body (``"model": ...``), else in the query (``?model=``), else in a
form field ``model`` (urlencoded, or a multipart part before the upload, as the OpenAI
clients send audio). Exact names win; then the globs (:func:`fnmatch.fnmatchcase`) in
the config's order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from email.message import Message
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import parse_qs

__all__ = [
    "is_pattern",
    "model_in_body",
    "model_in_form",
    "model_in_multipart",
    "multipart_boundary",
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


def model_in_form(body: bytes) -> str | None:
    """The ``model`` field of an urlencoded form body; None when there is none."""
    try:
        fields = parse_qs(body.decode("utf-8"), strict_parsing=False)
    except UnicodeDecodeError:
        return None
    found = fields.get("model")
    return found[0] if found and found[0] else None


def multipart_boundary(content_type: str | None) -> bytes | None:
    """The boundary of a ``multipart/form-data`` type; None for any other type."""
    if not content_type or not content_type.lower().startswith("multipart/form-data"):
        return None
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    return boundary.encode("latin-1") if isinstance(boundary, str) and boundary else None


_NAME = re.compile(rb'content-disposition:[^\r\n]*;\s*name="([^"]*)"', re.IGNORECASE)


def model_in_multipart(head: bytes, boundary: bytes) -> tuple[str | None, bool]:
    """The ``model`` field among the complete parts at the start of a multipart body.

    Returns (model, decided): ``decided`` is True once the answer cannot change with
    more of the body (the field was found, or a file part came first: what follows is
    the upload, which is never searched).
    """
    delimiter = b"--" + boundary
    parts = head.split(delimiter)
    # parts[0] is the preamble; the last piece may be incomplete.
    for part in parts[1:-1]:
        headers, sep, value = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        named = _NAME.search(headers)
        if named is None:
            continue
        if b"filename=" in headers.lower():
            return None, True
        if named.group(1) == b"model":
            text = value.removesuffix(b"\r\n").decode("utf-8", "replace").strip()
            return (text or None), True
    if len(parts) > 1 and parts[-1].startswith(b"--"):
        return None, True  # the closing delimiter: no more parts
    return None, False
