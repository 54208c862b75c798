"""Who sends a proxied request: the key it authenticated with (``api.keys``).

The daemon's own token is the key ``admin`` (every service, each at its own priority).
Each key of ``api.keys`` has a token file, a priority for its requests (default: the
service's own) and the services it may reach (default: all). A service's own listener
with ``auth: none`` admits requests as ``listen-<service>``, for that service only.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpusm.api.problems import HttpProblem
from gpusm.api.security import bearer_matches
from gpusm.config import Config
from gpusm.errors import ConfigError

__all__ = ["Caller", "KeyRing", "load_keys"]


@dataclass(frozen=True)
class Caller:
    """A proxied request's key: its name, its requests' priority (None: the
    service's), and the services it may use (None: every one)."""

    key: str
    priority: int | None = None
    services: frozenset[str] | None = None

    def check(self, service: str) -> None:
        """403 when this key may not use ``service``."""
        if self.services is not None and service not in self.services:
            raise HttpProblem(
                "forbidden",
                f"the key {self.key!r} may not use service {service!r} "
                f"(it may use: {', '.join(sorted(self.services)) or 'nothing'})",
                service=service,
            )


def load_keys(config: Config) -> list[tuple[str, Caller]]:
    """Each configured key's token and caller; ConfigError naming the key whose token
    file cannot be read or is empty."""
    found: list[tuple[str, Caller]] = []
    source = str(config.source or "<config>")
    for i, key in enumerate(config.api.keys):
        where = f"api.keys[{i}].token_file"
        try:
            token = key.token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                source,
                where,
                f"cannot read {key.token_file}: {exc.__class__.__name__}: {exc}",
                "create the file with the key's token on its first line",
            ) from None
        if not token:
            raise ConfigError(source, where, f"{key.token_file} is empty", "write a token in it")
        services = frozenset(key.services) if key.services is not None else None
        found.append((token, Caller(key.name, key.priority, services)))
    return found


class KeyRing:
    """The keys of the running config, read once per config (a reload reads them again)."""

    def __init__(self) -> None:
        self._config: Config | None = None
        self._keys: list[tuple[str, Caller]] = []

    def caller(self, config: Config, admin_token: str, authorization: str | None) -> Caller:
        """The caller whose token ``authorization`` carries; 401 when none does."""
        if bearer_matches(authorization, admin_token):
            return Caller("admin")
        if config is not self._config:
            self._keys = load_keys(config)
            self._config = config
        matched: Caller | None = None
        for token, caller in self._keys:
            # Every key is compared, so the time taken does not tell which one matched.
            if bearer_matches(authorization, token) and matched is None:
                matched = caller
        if matched is not None:
            return matched
        raise HttpProblem(
            "unauthorized",
            "missing or wrong bearer token; the proxy needs Authorization: Bearer <token> "
            "with a key from api.keys, or the daemon's own token ($GPUSM_TOKEN or its "
            "api-token file)",
            headers={"WWW-Authenticate": 'Bearer realm="gpusm"'},
        )
