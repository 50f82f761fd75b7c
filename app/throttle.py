"""Login throttling: growing delays after failed logins, then a temporary lock-out.

Failures are counted per account name *and* per client address (each with its own policy); a
login is refused without checking the password while either is in its waiting time. The same
wait applies whether or not the name exists, so the answer reveals nothing about accounts. A
success clears the name's counter; counters also reset after ``reset_after`` quiet seconds.
In memory, per app process: a restart forgets them (the lock-out is a brake, not a record).
The clock is injectable so tests need not sleep.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("align.app.auth")


@dataclass(frozen=True)
class ThrottlePolicy:
    """Wait after the n-th consecutive failure: 0 for n < ``free``, then ``base`` · 2^(n − free)
    seconds capped at ``max_delay``, and ``lock_seconds`` from the ``lock_after``-th failure on."""

    free: int = field(default=3, metadata={"help": "Failures allowed without any wait."})
    base: float = field(default=1.0, metadata={"help": "First wait (s); doubles with each failure."})
    max_delay: float = field(default=30.0, metadata={"help": "Longest growing wait (s)."})
    lock_after: int = field(default=10, metadata={"help": "Failures that lock the key."})
    lock_seconds: float = field(default=900.0, metadata={"help": "Lock-out length (s)."})
    reset_after: float = field(default=3600.0, metadata={"help": "Quiet time (s) that forgets failures."})

    def __post_init__(self):
        if not (0 <= self.free <= self.lock_after and self.base > 0 and self.max_delay >= self.base
                and self.lock_seconds >= self.max_delay and self.reset_after > 0):
            raise ValueError(f"inconsistent throttle policy {self}: need 0 <= free <= lock_after, base > 0, "
                             "max_delay >= base, lock_seconds >= max_delay, reset_after > 0")

    def wait_after(self, failures: int) -> float:
        if failures < self.free:
            return 0.0
        if failures >= self.lock_after:
            return self.lock_seconds
        return min(self.base * 2 ** (failures - self.free), self.max_delay)


ACCOUNT_POLICY = ThrottlePolicy()
# One address may host a team behind a NAT: more slack before it is slowed down.
ADDRESS_POLICY = ThrottlePolicy(free=20, base=1.0, max_delay=30.0, lock_after=100, lock_seconds=900.0)


@dataclass
class _Count:
    failures: int = 0
    last: float = 0.0
    until: float = 0.0  # no attempt before this time


class LoginThrottle:
    def __init__(self, account: ThrottlePolicy = ACCOUNT_POLICY, address: ThrottlePolicy = ADDRESS_POLICY,
                 clock: Callable[[], float] = time.monotonic):
        self.policies = {"account": account, "address": address}
        self.clock = clock
        self._counts: dict[tuple[str, str], _Count] = {}
        self._lock = threading.Lock()

    def _keys(self, name: str, address: str | None) -> list[tuple[str, str]]:
        keys = [("account", name.casefold())]
        if address:
            keys.append(("address", address))
        return keys

    def _get(self, key, now) -> _Count:
        c = self._counts.get(key)
        if c is not None and now - c.last > self.policies[key[0]].reset_after and now >= c.until:
            del self._counts[key]
            c = None
        return c or _Count()

    def wait(self, name: str, address: str | None = None) -> float:
        """Seconds before ``name`` (from ``address``) may try again; 0 = now."""
        now = self.clock()
        with self._lock:
            return max([0.0] + [self._get(k, now).until - now for k in self._keys(name, address)])

    def locked(self, name: str, address: str | None = None) -> bool:
        now = self.clock()
        with self._lock:
            for k in self._keys(name, address):
                c = self._get(k, now)
                if c.until > now and c.failures >= self.policies[k[0]].lock_after:
                    return True
        return False

    def failed(self, name: str, address: str | None = None) -> float:
        """Record a failure; returns the wait it imposes."""
        now = self.clock()
        wait = 0.0
        with self._lock:
            for k in self._keys(name, address):
                c = self._get(k, now)
                c.failures += 1
                c.last = now
                w = self.policies[k[0]].wait_after(c.failures)
                c.until = now + w
                self._counts[k] = c
                wait = max(wait, w)
                if c.failures == self.policies[k[0]].lock_after:
                    log.warning("login: %s %r locked for %.0f s after %d failures", k[0], k[1], w, c.failures)
        log.info("login failed: name=%r address=%s wait=%.1fs", name, address, wait)
        return wait

    def succeeded(self, name: str, address: str | None = None) -> None:
        with self._lock:
            self._counts.pop(("account", name.casefold()), None)
        log.info("login: %r from %s", name, address)

    def unlock(self, name: str) -> bool:
        """Forget ``name``'s failures (an admin's unlock); True if there were any."""
        with self._lock:
            had = self._counts.pop(("account", name.casefold()), None) is not None
        log.warning("login: account %r unlocked by an admin", name)
        return had

    def unlock_address(self, address: str) -> bool:
        with self._lock:
            return self._counts.pop(("address", address), None) is not None

    def blocked(self) -> list[dict]:
        """Keys with failures: kind, key, failures, seconds left (for the admin)."""
        now = self.clock()
        with self._lock:
            return [{"kind": k[0], "key": k[1], "failures": c.failures, "wait_s": round(max(0.0, c.until - now))}
                    for k, c in sorted(self._counts.items()) if c.failures]
