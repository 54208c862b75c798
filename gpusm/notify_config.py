"""Webhooks: the ``notify:`` key of the config file.

Each entry sends the events it names (``events:``, default every type) to one http(s)
``url`` as signed JSON POSTs, from the event log, in ``seq`` order, at least once. Only
URLs written in the config file are ever called. ``secret_file`` holds the HMAC key
(its content, surrounding whitespace stripped); it is read when the daemon starts.
``name`` keys the webhook's delivery cursor in the database (default: the URL), so
give one to keep the cursor when the URL changes.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gpusm.domain.events import EVENT_TYPES
from gpusm.errors import ConfigError

__all__ = ["ALL_EVENTS", "WebhookConfig", "Webhooks", "display_url"]

# ``events: ["*"]`` (or no ``events:``) means every event type.
ALL_EVENTS = "*"


def display_url(url: str) -> str:
    """``url`` without credentials or query (what status, metrics and logs may show)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class WebhookConfig(BaseModel):
    """One receiver: where to POST, which event types, and the signing secret."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    secret_file: Path
    events: list[str] = [ALL_EVENTS]
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,199}$")] | None = None
    # Bound on one POST (connect, send, answer).
    timeout_s: Annotated[float, Field(gt=0)] = 10.0
    # Events per POST at most (a backlog goes out in batches of this many).
    batch_size: Annotated[int, Field(ge=1, le=1000)] = 100
    # After a failure: wait min_backoff_s, doubling per further failure, up to max_backoff_s.
    min_backoff_s: Annotated[float, Field(gt=0)] = 1.0
    max_backoff_s: Annotated[float, Field(gt=0)] = 60.0

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError as exc:
            raise ValueError(f"url {url!r}: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the url must be http:// or https:// with a host, got {url!r}")
        return url

    @field_validator("events")
    @classmethod
    def _known_types(cls, events: list[str]) -> list[str]:
        if not events:
            raise ValueError(f"events is empty; leave it out or use [{ALL_EVENTS!r}] for all")
        unknown = [e for e in events if e != ALL_EVENTS and e not in EVENT_TYPES]
        if unknown:
            close = difflib.get_close_matches(unknown[0], EVENT_TYPES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            # A custom error type: config.py then adds its generic fix, not this text again.
            raise PydanticCustomError(
                "unknown_event_type",
                "unknown event type {names}{hint}; the types are {valid}",
                {
                    "names": ", ".join(map(repr, unknown)),
                    "hint": hint,
                    "valid": f"{ALL_EVENTS!r} (every type), " + ", ".join(sorted(EVENT_TYPES)),
                },
            )
        return events

    @model_validator(mode="after")
    def _backoff_order(self) -> WebhookConfig:
        if self.min_backoff_s > self.max_backoff_s:
            raise ValueError(
                f"min_backoff_s ({self.min_backoff_s:g}) is above max_backoff_s "
                f"({self.max_backoff_s:g}); make min_backoff_s the smaller"
            )
        return self

    @property
    def key(self) -> str:
        """What names this webhook's cursor, status entry and metrics: ``name``, else the URL
        as :func:`display_url` shows it."""
        return self.name or display_url(self.url)

    @property
    def types(self) -> tuple[str, ...] | None:
        """The event types to send, or None for every type."""
        return None if ALL_EVENTS in self.events else tuple(dict.fromkeys(self.events))

    def resolved(self, base: Path) -> WebhookConfig:
        """This webhook with ``secret_file`` made absolute against ``base``."""
        if self.secret_file.is_absolute():
            return self
        return self.model_copy(update={"secret_file": (base / self.secret_file).resolve()})

    def read_secret(self, source: str, index: int) -> bytes:
        """The HMAC key from ``secret_file``; ConfigError if it is missing, unreadable or empty."""
        key = f"notify[{index}].secret_file"
        try:
            secret = self.secret_file.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(
                source,
                key,
                f"cannot read the webhook secret {self.secret_file} ({exc.strerror or exc})",
                "create the file with a random secret (e.g. openssl rand -hex 32 > FILE) "
                "readable by the daemon's user",
            ) from None
        if not secret:
            raise ConfigError(
                source,
                key,
                f"the webhook secret {self.secret_file} is empty",
                "write a random secret into it (e.g. openssl rand -hex 32 > FILE)",
            )
        return secret


def _distinct(webhooks: list[WebhookConfig]) -> list[WebhookConfig]:
    seen: set[str] = set()
    for hook in webhooks:
        if hook.key in seen:
            raise ValueError(
                f"two webhooks are both named {hook.key!r}; give each a distinct name:"
            )
        seen.add(hook.key)
    return webhooks


# The ``notify:`` key: webhooks with distinct names (each has its own cursor).
Webhooks = Annotated[list[WebhookConfig], AfterValidator(_distinct)]
