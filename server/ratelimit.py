"""Token-bucket rate limits per tenant, per user and per device.

Each sync request (HTTP push or pull, a push frame on a socket) takes one token from
its device's, its user's and its tenant's bucket; the tightest one decides. A bucket
holds at most N tokens and refills N per period, so a device may burst N requests and
then sustain N per period. State is per node: behind a load balancer with k nodes a
client can reach up to k times the limit, unless the balancer pins devices to nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(second|minute|hour)\s*$")


BURST_SECONDS = 10.0
MIN_BURST = 10


@dataclass(frozen=True, slots=True)
class Rate:
    """N per period, e.g. `Rate.parse("100/hour")`."""

    count: int
    period_s: float

    @property
    def burst(self) -> int:
        """Tokens a bucket holds: ten seconds' worth (at least 10, at most N).

        A bucket that held a whole period would let "6000/minute" arrive in one second.
        """
        return min(
            self.count, max(MIN_BURST, math.ceil(self.count * BURST_SECONDS / self.period_s))
        )

    @classmethod
    def parse(cls, spec: str) -> Rate:
        match = _SPEC.match(spec)
        if match is None or int(match.group(1)) < 1:
            raise ValueError(f"a rate is N/second, N/minute or N/hour with N >= 1, not {spec!r}")
        return cls(int(match.group(1)), _PERIODS[match.group(2)])

    def __str__(self) -> str:
        unit = {v: k for k, v in _PERIODS.items()}.get(self.period_s, f"{self.period_s}s")
        return f"{self.count}/{unit}"


RESERVED_S = 0.5  # a reservation not claimed by then is dropped (its request went away)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float
    reserved: deque[float] | None = None  # when each reservation lapses (made on first use)


class Limited(Exception):
    """Over a limit; retry after `retry_after` whole seconds."""

    def __init__(self, scope: str, message: str, retry_after: int) -> None:
        super().__init__(f"{message}; retry in {retry_after} s")
        self.scope, self.retry_after = scope, retry_after


def _over_rate(scope: str, rate: Rate, retry_after: int) -> Limited:
    return Limited(scope, f"rate limit of {rate} per {scope} reached", retry_after)


class Buckets:
    """Buckets of one kind (say, per device), at most `capacity` of them kept."""

    def __init__(
        self,
        scope: str,
        rate: Rate,
        capacity: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.scope, self.rate = scope, rate
        self._capacity = capacity
        self._clock = clock
        self._buckets: OrderedDict[tuple[str, ...], _Bucket] = OrderedDict()

    def wait_time(self, key: tuple[str, ...]) -> float:
        """Seconds until `key` has a token not reserved (0: it has one now)."""
        bucket = self._refilled(key)
        free = bucket.tokens - (len(bucket.reserved) if bucket.reserved else 0)
        return 0.0 if free >= 1 else (1 - free) * self._per_token()

    def take(self, key: tuple[str, ...]) -> None:
        self._refilled(key).tokens -= 1

    def reserve(self, key: tuple[str, ...]) -> None:
        """Set a token aside for a request on its way to `take` (for `RESERVED_S` at most)."""
        bucket = self._refilled(key)
        if bucket.reserved is None:
            bucket.reserved = deque()
        bucket.reserved.append(self._clock() + RESERVED_S)

    def release(self, key: tuple[str, ...]) -> None:
        """Drop the oldest reservation of `key`, if any (its request is being checked)."""
        bucket = self._buckets.get(key)
        if bucket is not None and bucket.reserved:
            bucket.reserved.popleft()

    def give_back(self, key: tuple[str, ...]) -> None:
        """Return a token taken for work that was then undone."""
        bucket = self._refilled(key)
        bucket.tokens = min(float(self.rate.burst), bucket.tokens + 1)

    def _per_token(self) -> float:
        return self.rate.period_s / self.rate.count

    def _refilled(self, key: tuple[str, ...]) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.rate.burst), now)
            if len(self._buckets) > self._capacity:
                self._buckets.popitem(last=False)  # the oldest: refilled by now, most likely
        else:
            self._buckets.move_to_end(key)
            gained = (now - bucket.updated) / self._per_token()
            bucket.tokens = min(float(self.rate.burst), bucket.tokens + gained)
            bucket.updated = now
            while bucket.reserved and bucket.reserved[0] <= now:
                bucket.reserved.popleft()
        return bucket


@dataclass(frozen=True, slots=True)
class RateSettings:
    """Defaults: see the README ("Rate limits") for why not the old API's 100/50 per hour."""

    device: Rate = Rate(60, 60.0)
    user: Rate = Rate(120, 60.0)
    tenant: Rate = Rate(6000, 60.0)
    sockets_per_device: int = 4
    record: Rate = Rate(600, 60.0)  # accepted updates of one record
    sockets_per_user: int = 64  # device and Yjs sockets of one user (rotating device ids)
    preauth_sockets: int = 1000  # sockets that have not said hello yet
    tenant_in_flight: int = 8  # sync requests of one tenant being merged at once
    tenant_queue: int = 256  # of one tenant's requests waiting for a slot; past it: 429
    early_retry_hold_s: float = 1.0  # longest a refusal of a client back too soon is held
    max_held: int = 1000  # refusals held at once; past it they are answered at once
    max_held_per_user: int = 4  # of one user's; past it they are answered at once


class RateLimiter:
    def __init__(self, settings: RateSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._kinds = (
            Buckets("device", settings.device, clock=clock),
            Buckets("user", settings.user, clock=clock),
            Buckets("tenant", settings.tenant, clock=clock),
        )
        self.early_retries = EarlyRetries(
            settings.early_retry_hold_s, settings.max_held, settings.max_held_per_user, clock
        )
        self._sockets: dict[tuple[str, str], int] = {}  # (tenant, device) -> open
        self._user_sockets: dict[tuple[str, str], int] = {}  # (tenant, user) -> open

    def check(self, tenant: str, user: str, device: str | None) -> None:
        """Take one request's token from each bucket, or raise Limited and take none.

        Each bucket's oldest reservation (`reserve`) is given up first: this request's if
        it made one. If it made none, another request's goes a little early, which only
        lets one more request through to its handler's check (a reservation is a hint
        for `refusal`; tokens are taken here alone)."""
        keys = _keys(tenant, user, device)
        for kind, key in zip(self._kinds, keys):
            kind.release(key)
        refused = self._refusal(keys)
        if refused is not None:
            raise refused
        for kind, key in zip(self._kinds, keys):
            kind.take(key)

    def reserve(self, tenant: str, user: str, device: str | None) -> None:
        """Set a token of each bucket aside for a request that `refusal` let through and
        that will be `check`ed in a moment: requests looked at meanwhile do not count on
        it (a refilled token let several through, and all but one were then refused by
        the handler at three times the cost)."""
        for kind, key in zip(self._kinds, _keys(tenant, user, device)):
            kind.reserve(key)

    def refusal(self, tenant: str, user: str, device: str | None) -> Limited | None:
        """What `check` would raise now, or None if every bucket has a token not reserved
        (none taken)."""
        return self._refusal(_keys(tenant, user, device))

    def _refusal(self, keys: tuple[tuple[str, ...], ...]) -> Limited | None:
        waits = [kind.wait_time(key) for kind, key in zip(self._kinds, keys)]
        worst = max(range(3), key=lambda i: waits[i])
        if waits[worst] <= 0:
            return None
        kind = self._kinds[worst]
        return _over_rate(kind.scope, kind.rate, max(1, math.ceil(waits[worst])))

    def open_socket(self, tenant: str, user: str, device: str | None) -> str | None:
        """Count a socket; what is over its cap ("device" or "user"), or None if it may open.

        `device=None`: a socket not capped per device (a Yjs socket: a browser opens one
        per record it shows). Every socket counts against its user's cap, so rotating
        device ids cannot open sockets without end.
        """
        user_key, device_key = (tenant, user), (tenant, device or "")
        if self._user_sockets.get(user_key, 0) >= self.settings.sockets_per_user:
            return "user"
        if device is not None:
            if self._sockets.get(device_key, 0) >= self.settings.sockets_per_device:
                return "device"
            _count(self._sockets, device_key, 1)
        _count(self._user_sockets, user_key, 1)
        return None

    def close_socket(self, tenant: str, user: str, device: str | None) -> None:
        _count(self._user_sockets, (tenant, user), -1)
        if device is not None:
            _count(self._sockets, (tenant, device), -1)


class EarlyRetries:
    """Clients that ask again before their Retry-After is up, and how long to hold their 429.

    A refused client is told to retry after N seconds. One that asks again sooner (a
    buggy retry loop, a flood) is refused again, and that answer is held until its N
    seconds are up (at most `max_hold_s`), so a client that waits for each answer sends
    about one refused request per Retry-After instead of one per round trip: each
    refusal costs the server about as much CPU as a small push, and that CPU is taken
    from every tenant. The first refusal is never held. Keyed by (tenant, user), which
    the signed token gives (a device id is the client's choice).

    At most `max_held` refusals wait at once, and `max_held_per_user` of one user's: a
    sync client has a request or two in flight per device, while a client that keeps
    many in flight sends its next at once whatever we hold, so holding more of its
    requests would save nothing and keep more of them in memory (a held request is an
    aiohttp request, its task and frames, walked by every young garbage collection).
    """

    def __init__(
        self,
        max_hold_s: float,
        max_held: int,
        max_held_per_user: int = 4,
        clock: Callable[[], float] = time.monotonic,
        capacity: int = 100_000,
    ) -> None:
        self.max_hold_s, self.max_held = max_hold_s, max_held
        self.max_held_per_user = max_held_per_user
        self.held = 0
        self._held_by: dict[tuple[str, str], int] = {}
        self._clock = clock
        self._capacity = capacity
        self._until: OrderedDict[tuple[str, str], float] = OrderedDict()

    def hold_time(self, key: tuple[str, str], retry_after: int) -> float:
        """Seconds to hold this refusal (0: answer now); a refusal not held starts a window."""
        now = self._clock()
        until = self._until.get(key)
        if until is not None and now < until:
            full = self.held >= self.max_held
            if full or self._held_by.get(key, 0) >= self.max_held_per_user:
                return 0.0
            return min(until - now, self.max_hold_s)
        self._until[key] = now + retry_after
        self._until.move_to_end(key)
        if len(self._until) > self._capacity:
            self._until.popitem(last=False)
        return 0.0

    async def wait_out(self, key: tuple[str, str], retry_after: int) -> bool:
        """Hold the refusal if the client came back too soon; True if it was held."""
        seconds = self.hold_time(key, retry_after)
        if seconds <= 0:
            return False
        self.start_hold(key)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.end_hold(key)
        return True

    def start_hold(self, key: tuple[str, str]) -> None:
        """Count a refusal held for `hold_time`; `end_hold` when it is answered or dropped."""
        self.held += 1
        _count(self._held_by, key, 1)

    def end_hold(self, key: tuple[str, str]) -> None:
        self.held -= 1
        _count(self._held_by, key, -1)


def _keys(tenant: str, user: str, device: str | None) -> tuple[tuple[str, ...], ...]:
    """A request's bucket keys: its device's, its user's, its tenant's."""
    return (tenant, device or f"user:{user}"), (tenant, user), (tenant,)


def _count(counts: dict[tuple[str, str], int], key: tuple[str, str], step: int) -> None:
    left = counts.get(key, 0) + step
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


class TenantSlots:
    """How many sync requests of one tenant merge at once; the rest wait their turn.

    The token buckets bound how much a tenant asks for over time; this bounds how much
    of the server one tenant holds at any moment. A tenant alone on the node may merge
    `in_flight` requests at once (small batches commit together). While another tenant
    has asked within the last `alone_after_s` seconds, each tenant gets `shared`: one,
    so a tenant bursting at its quota queues behind itself instead of in front of
    everyone else. With two, one request's commit overlapped the next one's merge and
    a burst kept the database writer busy back to back: every commit of a quiet tenant
    waited for one of the burst's (the noisy-neighbour bench's quiet p99 was 40-80 ms in
    the flood's first second, against 11-14 ms with one). Judged over a window rather
    than by the requests in flight at this instant, because a quiet tenant has none in
    flight most of the time, and each of those moments handed the bursting one its full
    allowance again.
    """

    def __init__(
        self, in_flight: int, queue: int, shared: int = 1, alone_after_s: float = 2.0
    ) -> None:
        self._in_flight, self._queue = in_flight, queue
        self._shared = min(shared, in_flight)
        self._alone_after_s = alone_after_s
        self._tenants: dict[str, _TenantTurns] = {}
        self._asked: OrderedDict[str, float] = OrderedDict()  # tenant -> last asked, oldest first

    @contextlib.asynccontextmanager
    async def slot(self, tenant: str) -> AsyncIterator[None]:
        self._asked_now(tenant)
        turns = self._tenants.setdefault(tenant, _TenantTurns())
        if turns.active + len(turns.waiting) >= self._in_flight + self._queue:
            raise Limited("tenant", f"{self._queue} requests of this tenant are already waiting", 1)
        if turns.waiting or turns.active >= self._limit(tenant):
            await self._wait(tenant, turns)
        else:
            turns.active += 1
        try:
            yield
        finally:
            turns.active -= 1
            self._settle(tenant, turns)

    def _asked_now(self, tenant: str) -> None:
        self._asked[tenant] = time.monotonic()
        self._asked.move_to_end(tenant)

    def _limit(self, tenant: str) -> int:
        return self._in_flight if self._alone(tenant) else self._shared

    def _alone(self, tenant: str) -> bool:
        """No other tenant asked within the window, nor holds or awaits a slot still."""
        horizon = time.monotonic() - self._alone_after_s
        while self._asked and next(iter(self._asked.values())) < horizon:
            self._asked.popitem(last=False)
        return all(t == tenant for t in self._asked) and all(t == tenant for t in self._tenants)

    async def _wait(self, tenant: str, turns: _TenantTurns) -> None:
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        turns.waiting.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn in turns.waiting:
                turns.waiting.remove(turn)
            elif turn.done() and not turn.cancelled():  # the turn was ours: pass it on
                turns.active -= 1
            self._settle(tenant, turns)
            raise

    def _settle(self, tenant: str, turns: _TenantTurns) -> None:
        if not turns.active and not turns.waiting:
            del self._tenants[tenant]
        self._hand_out()

    def _hand_out(self) -> None:
        """Start waiting requests, oldest first in each tenant, up to the current limit."""
        for tenant, turns in self._tenants.items():
            limit = self._limit(tenant)
            while turns.waiting and turns.active < limit:
                turn = turns.waiting.popleft()
                if not turn.done():
                    turns.active += 1
                    turn.set_result(None)


@dataclass(slots=True)
class _TenantTurns:
    active: int = 0
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)
