"""Leases: which client holds which services now, and when a lease ends by itself.

A client's lease is its current phase (the services it needs, at its priority). It
ends when the client releases it, when a service of it is preempted or stopped
(revoked: the client's next call hears why), or, with a ``ttl_s``, when the client is
not heard from for that long (expired). The engine records each end as an event.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from gpusm.ports import Clock

__all__ = ["Lease", "LeaseBook"]


@dataclass(frozen=True)
class Lease:
    """A client's current phase: the services it needs and the priority it asked with.

    With ``ttl_s``, the lease ends (``LeaseExpired``) when its client is not heard from
    for that long; without, it lasts until released, revoked or the coordinator stops.
    """

    phase: str
    services: frozenset[str]
    priority: int
    ttl_s: float | None = None


class LeaseBook:
    """Every client's lease, when each client was last heard from, and revocations.

    Not thread-safe by itself: the engine's lock guards it. ``version`` moves with every
    change of who holds what (renewals do not count).
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self._heard: dict[str, float] = {}
        self._revoked: dict[str, str] = {}
        self.version = 0

    # ------------------------------------------------------------ reading
    def get(self, client: str) -> Lease | None:
        """``client``'s lease, if it holds one."""
        return self._leases.get(client)

    def items(self) -> Iterator[tuple[str, Lease]]:
        """(client, lease) pairs, in the order the clients first took one."""
        return iter(list(self._leases.items()))

    def __contains__(self, client: object) -> bool:
        return client in self._leases

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._leases))

    def others(self, client: str | None) -> dict[str, frozenset[str]]:
        """Services held by each client other than ``client``."""
        return {c: lease.services for c, lease in self._leases.items() if c != client}

    def leased(self) -> set[str]:
        """Every service some client's current phase holds."""
        return {name for lease in self._leases.values() for name in lease.services}

    def holders(self, service: str) -> list[str]:
        """The clients whose lease holds ``service``."""
        return [c for c, lease in self._leases.items() if service in lease.services]

    def expires_in(self, client: str) -> float | None:
        """Seconds until ``client``'s lease expires unheard-from; None without a TTL."""
        lease = self._leases.get(client)
        if lease is None or lease.ttl_s is None:
            return None
        return max(0.0, lease.ttl_s - self._silent(client))

    # ------------------------------------------------------------ changes
    def hold(self, client: str, lease: Lease) -> None:
        """``client`` now holds ``lease``, heard from now."""
        self._heard[client] = self._clock.monotonic()
        self._revoked.pop(client, None)
        if self._leases.get(client) != lease:
            self._leases[client] = lease
            self.version += 1

    def drop(self, client: str) -> Lease | None:
        """``client`` holds nothing any more; returns what it held."""
        lease = self._leases.pop(client, None)
        self._heard.pop(client, None)
        if lease is not None:
            self.version += 1
        return lease

    def renew(self, client: str) -> bool:
        """``client`` was heard from: its TTL starts again; False if it holds no lease."""
        if client not in self._leases:
            return False
        self._heard[client] = self._clock.monotonic()
        return True

    def revoke(self, client: str, reason: str) -> Lease | None:
        """End ``client``'s lease; its next call hears ``reason``. Returns what it held."""
        lease = self.drop(client)
        if lease is not None:
            self._revoked[client] = reason
        return lease

    def take_revocation(self, client: str) -> str | None:
        """Why ``client``'s last lease was revoked, once; None if it was not."""
        return self._revoked.pop(client, None)

    def expired(self) -> list[tuple[str, Lease, float]]:
        """(client, lease, silent seconds) of each lease past its TTL; they are dropped."""
        ended = []
        for client, lease in list(self._leases.items()):
            silent = self._silent(client)
            if lease.ttl_s is not None and silent > lease.ttl_s:
                self.drop(client)
                ended.append((client, lease, silent))
        return ended

    def _silent(self, client: str) -> float:
        now = self._clock.monotonic()
        return now - self._heard.get(client, now)
