"""Login throttling: growing delays after failed logins, then a temporary lock-out.

Failures are counted per account name *and* per client address (each with its own policy); a
login is refused without checking the password while either is in its waiting time. The same
wait applies whether or not the name exists, so the answer reveals nothing about accounts. A
success clears the name's counter; counters also reset after ``reset_after`` quiet seconds.
The counts live in the store (table ``login_failures``, schema v3), so a restart of the app does not lift
a lock-out and every app process on one store shares them. The clock is injectable so tests need not sleep.
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


class MemoryCounts:
    """Failure counts in this process only (tests, or a throttle without a store); the ``Store`` has the same
    two methods and keeps them in the database, where a restart does not lose them."""

    def __init__(self):
        self._counts: dict[tuple[str, str], tuple] = {}
        self._lock = threading.Lock()

    def login_counts(self, keys=None) -> dict:
        with self._lock:
            return {k: c for k, c in self._counts.items() if keys is None or k in keys}

    def update_login_count(self, kind: str, key: str, fn: Callable) -> tuple:
        with self._lock:
            old = self._counts.get((kind, key))
            new = fn(old)
            if new is None:
                self._counts.pop((kind, key), None)
            else:
                self._counts[(kind, key)] = new
            return old, new


class LoginThrottle:
    """``counts``: where the (failures, last, until) per key live -- the app passes its ``Store`` (shared by
    its processes, kept across restarts); default in memory. ``clock``: wall time, as the counts may
    outlive the process."""

    def __init__(self, account: ThrottlePolicy = ACCOUNT_POLICY, address: ThrottlePolicy = ADDRESS_POLICY,
                 clock: Callable[[], float] = time.time, counts=None):
        self.policies = {"account": account, "address": address}
        self.clock = clock
        self.counts = counts if counts is not None else MemoryCounts()

    def _keys(self, name: str, address: str | None) -> list[tuple[str, str]]:
        keys = [("account", name.casefold())]
        if address:
            keys.append(("address", address))
        return keys

    def _live(self, kind: str, c: tuple | None, now: float) -> tuple | None:
        """The count, or None once ``reset_after`` quiet seconds have passed (and no wait is running)."""
        if c is not None and now - c[1] > self.policies[kind].reset_after and now >= c[2]:
            return None
        return c

    def _live_counts(self, name: str, address: str | None, now: float) -> dict:
        got = self.counts.login_counts(self._keys(name, address))
        return {k: c for k, c in got.items() if self._live(k[0], c, now)}

    def wait(self, name: str, address: str | None = None) -> float:
        """Seconds before ``name`` (from ``address``) may try again; 0 = now."""
        now = self.clock()
        return max([0.0] + [c[2] - now for c in self._live_counts(name, address, now).values()])

    def locked(self, name: str, address: str | None = None) -> bool:
        now = self.clock()
        return any(c[2] > now and c[0] >= self.policies[k[0]].lock_after
                   for k, c in self._live_counts(name, address, now).items())

    def failed(self, name: str, address: str | None = None) -> float:
        """Record a failure; returns the wait it imposes."""
        now = self.clock()
        wait = 0.0
        for kind, key in self._keys(name, address):
            policy = self.policies[kind]

            def bump(c, kind=kind, policy=policy):
                n = (c[0] if self._live(kind, c, now) else 0) + 1
                return (n, now, now + policy.wait_after(n))
            _, (n, _, until) = self.counts.update_login_count(kind, key, bump)
            wait = max(wait, until - now)
            if n == policy.lock_after:
                log.warning("login: %s %r locked for %.0f s after %d failures", kind, key, until - now, n)
        log.info("login failed: name=%r address=%s wait=%.1fs", name, address, wait)
        return wait

    def _forget(self, kind: str, key: str) -> bool:
        return self.counts.update_login_count(kind, key, lambda c: None)[0] is not None

    def succeeded(self, name: str, address: str | None = None) -> None:
        if self.counts.login_counts([("account", name.casefold())]):  # a read; a write only if there is one
            self._forget("account", name.casefold())
        log.info("login: %r from %s", name, address)

    def unlock(self, name: str) -> bool:
        """Forget ``name``'s failures (an admin's unlock); True if there were any."""
        had = self._forget("account", name.casefold())
        log.warning("login: account %r unlocked by an admin", name)
        return had

    def unlock_address(self, address: str) -> bool:
        return self._forget("address", address)

    def blocked(self) -> list[dict]:
        """Keys with failures: kind, key, failures, seconds left (for the admin)."""
        now = self.clock()
        return [{"kind": k[0], "key": k[1], "failures": c[0], "wait_s": round(max(0.0, c[2] - now))}
                for k, c in sorted(self.counts.login_counts().items()) if self._live(k[0], c, now)]
