"""The API's guards: the bearer token and the local-``Host`` rule.

* Every state-changing call needs ``Authorization: Bearer <token>``. The token comes
  from ``$GPUSM_TOKEN`` or, failing that, the token file (``api.token_file``, default
  ``<state_dir>/api-token``), created at the first ``gpusm serve`` with mode 0600.
  Tokens are compared in constant time (``hmac.compare_digest``). Reading the token
  (:func:`gpusm.wire.read_token`) is shared with the client.
* A request whose ``Host`` is not local (127.0.0.1, localhost, [::1] or the configured
  listen host, any port) is refused: a web page on another origin that rebinds its DNS
  name to 127.0.0.1 still sends its own name as ``Host``.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from gpusm.errors import ConfigError
from gpusm.wire import read_token, read_token_file

__all__ = [
    "LOCAL_HOSTS",
    "HostGuard",
    "bearer_matches",
    "host_of",
    "load_or_create_token",
]

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def load_or_create_token(path: Path) -> str:
    """The daemon's token: ``$GPUSM_TOKEN``, else ``path``, created (mode 0600) if missing."""
    found = read_token(path)
    if found is not None:
        return found
    token = secrets.token_urlsafe(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # O_EXCL: if two daemons race, exactly one writes and the other reads its token.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return read_token_file(path)
    except OSError as exc:
        raise ConfigError(
            str(path), "api.token_file", f"cannot create the API token ({exc})", "check the folder"
        ) from exc
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(token + "\n")
    return token


def bearer_matches(authorization: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token`` as a bearer token."""
    if not authorization:
        return False
    scheme, _, given = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Bytes, so a non-ASCII header is a mismatch rather than a TypeError.
    return hmac.compare_digest(given.strip().encode(), token.encode())


def host_of(header: str) -> str:
    """The host part of a ``Host`` header, lower-cased, without port, brackets or final dot."""
    value = header.strip().lower()
    if value.startswith("["):
        host, _, _ = value[1:].partition("]")
        return host
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or ":" in host:
        host = value
    return host.rstrip(".")


class HostGuard:
    """Decides whether a ``Host`` header names this machine (see the module docstring)."""

    def __init__(self, extra_hosts: Iterable[str] = ()) -> None:
        self.allowed = LOCAL_HOSTS | {host_of(h) for h in extra_hosts if h}

    def allows(self, header: str | None) -> bool:
        """True for a local host name; a missing header is refused."""
        return header is not None and host_of(header) in self.allowed
