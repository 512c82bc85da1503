"""Per-key quotas in Redis: requests per minute (``rpm``) and tokens per minute (``tpm``).

Semantics (documented for the README):

- **Window**: fixed one-minute windows taken from Redis' own clock (``TIME`` inside the script),
  so every gateway process and host shares one budget and one clock. A client can spend up to
  twice its rate across a window boundary; in exchange a check is one round trip and O(1).
- **Atomicity**: one Lua script checks both limits and increments both counters, so concurrent
  requests on several gateway processes can never overspend.
- **Tokens: reserve, then settle.** Before the request we reserve an upper bound of what it can
  cost (``gateway.request_body.budget``): the prompt's UTF-8 bytes (no token is shorter than a byte;
  token-id prompts count as they are) plus the most the engine is allowed to produce, which the
  gateway writes into the body it sends (the larger of ``max_tokens`` and
  ``max_completion_tokens``; with neither, the model's whole context). After the answer we
  settle: the reservation is replaced by the real ``usage.total_tokens`` (a refund; corrections
  are batched and written every 0.05 s). Since no answer can cost more than its reservation,
  concurrent requests over any number of gateway processes never serve more than ``tpm`` in a
  window. Should usage ever exceed the reservation, the excess is charged to the window current
  when it is settled (when the tokens were produced), not to the past one. A single request whose
  reservation alone exceeds ``tpm`` is refused (429, code ``tokens_exceed_limit``).
- **Refusal**: 429 ``rate_limit_error`` with ``Retry-After`` = seconds to the next window.
- **Redis unreachable: fail open (or closed).** Only a lost connection (connection refused or
  reset, a timeout) skips the check, and only with ``quota_fail_open`` (the default): inference
  keeps working without quotas. Each skipped check counts in
  ``tunegate_gateway_quota_fail_open_total`` and is logged (at most every 10 s); after a failure
  Redis is not asked again for ``redis_retry_after_s`` so an outage adds no per-request latency.
  With ``quota_fail_open=false`` those requests get a 503 instead. Any other Redis error (a script
  or value error) refuses only the request that met it (429, code ``quota_check_failed``) and
  never switches quotas off. Redis calls on the request path time out after ``redis_timeout_s``.
- **Leases**: one Redis call takes up to 1% of a key's per-minute limits (at least what the
  request needs) for this process; later requests spend that locally until it runs out or the
  window ends. Busy keys with large limits thus cost one Redis call per ~1% of their budget, not
  one per request. The budget stays exact across processes (what is leased is counted in Redis);
  the price is that a lease left unspent at the end of a window is lost, up to 1% of the limit per
  gateway process and window. Small limits (under 100 per minute) lease 1 at a time: exact.
- Keys with neither ``rpm`` nor ``tpm`` never touch Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from gateway.auth import KeyInfo
from gateway.metrics import Metrics
from shared.errors import Overloaded, RateLimited

log = logging.getLogger("tunegate.gateway.quotas")

WINDOW_S = 60
FLUSH_S = 0.05  # how often settled token corrections are written, seconds
LEASE_FRACTION = 0.01  # share of a key's per-minute limits one process takes per Redis call

# KEYS[1]: key prefix; ARGV: rpm (0 = none), tpm (0 = none), tokens this request needs,
# requests and tokens wanted for the lease (>= 1 and >= the need).
# Returns {0, window, requests granted, tokens granted} when admitted,
# {1|2|3, retry_after_s} when refused (rpm | tpm | request larger than tpm).
_RESERVE = """
local now = redis.call('TIME')
local window = math.floor(tonumber(now[1]) / 60)
local retry = 60 - (tonumber(now[1]) % 60)
local k = KEYS[1] .. ':' .. window
local rpm = tonumber(ARGV[1]); local tpm = tonumber(ARGV[2]); local need = tonumber(ARGV[3])
local want_r = tonumber(ARGV[4]); local want_t = tonumber(ARGV[5])
if tpm > 0 and need > tpm then return {3, 60} end
local r = tonumber(redis.call('HGET', k, 'r') or '0')
local t = tonumber(redis.call('HGET', k, 't') or '0')
local got_r = want_r
if rpm > 0 then
  if r + 1 > rpm then return {1, retry} end
  got_r = math.min(want_r, rpm - r)
end
local got_t = want_t
if tpm > 0 then
  if t + need > tpm then return {2, retry} end
  got_t = math.min(want_t, tpm - t)
end
redis.call('HINCRBY', k, 'r', got_r)
redis.call('HINCRBY', k, 't', got_t)
redis.call('EXPIRE', k, 120)
return {0, window, got_r, got_t}
"""

# KEYS[1]: the reservation's window key, KEYS[2]: the key prefix; ARGV[1]: token delta (real -
# reserved). A refund goes to the reservation's window (no-op once it expired); an excess is
# charged to the current window, when the tokens were produced.
_SETTLE = """
local delta = tonumber(ARGV[1])
if delta > 0 then
  local window = math.floor(tonumber(redis.call('TIME')[1]) / 60)
  local k = KEYS[2] .. ':' .. window
  redis.call('HINCRBY', k, 't', delta)
  redis.call('EXPIRE', k, 120)
elseif redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 't', delta)
end
return 0
"""


@dataclass
class Reservation:
    redis_key: str  # the window's hash
    tokens: int


@dataclass
class Lease:
    """Budget this process took from Redis ahead of use, for one key and one window."""

    redis_key: str
    window: int  # minutes since the epoch, Redis' clock
    requests: int
    tokens: int


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` means Redis could not be reached (the only case that may fail open)."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeout

    return isinstance(exc, RedisConnectionError | RedisTimeout | OSError | asyncio.TimeoutError)


class Quotas:
    def __init__(self, redis: Any | None, metrics: Metrics, *, timeout_s: float = 0.25,
                 retry_after_s: float = 1.0, fail_open: bool = True) -> None:
        self.redis = redis
        self.fail_open = fail_open
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self._skip_until = 0.0
        self._last_log = 0.0
        self._reserve = redis.register_script(_RESERVE) if redis is not None else None
        self._settle = redis.register_script(_SETTLE) if redis is not None else None
        # (window key, refund or excess) -> token correction not yet written
        self._pending: dict[tuple[str, bool], int] = {}
        self._leases: dict[str, Lease] = {}  # key id -> budget taken ahead (see module doc)
        self._locks: dict[str, asyncio.Lock] = {}  # key id -> lease call in progress
        self._flusher: asyncio.Task[None] | None = None

    async def reserve(self, key: KeyInfo, tokens: int) -> Reservation | None:
        """Admit or raise ``RateLimited``; None when no quota applies (or Redis is down)."""
        if not key.rpm and not key.tpm:
            return None
        if self._reserve is None:
            self._unavailable("no Redis configured")
            return None
        taken = self._from_lease(key, tokens)
        if taken is not None:
            return taken
        # One lease call per key at a time: a burst of misses waits for it instead of opening a
        # burst of Redis connections.
        lock = self._locks.setdefault(key.id, asyncio.Lock())
        async with lock:
            taken = self._from_lease(key, tokens)
            if taken is not None:
                return taken
            if time.monotonic() < self._skip_until:
                self._unavailable(None)
                return None
            return await self._lease(key, tokens)

    def _from_lease(self, key: KeyInfo, tokens: int) -> Reservation | None:
        lease = self._leases.get(key.id)
        if (lease is not None and lease.window == int(time.time() // WINDOW_S)
                and (not key.rpm or lease.requests >= 1)
                and (not key.tpm or lease.tokens >= tokens)):
            lease.requests -= 1
            lease.tokens -= tokens
            return Reservation(lease.redis_key, tokens)
        return None

    async def _lease(self, key: KeyInfo, tokens: int) -> Reservation | None:
        assert self._reserve is not None
        prefix = f"tg:quota:{key.id}"
        want_r = max(1, int((key.rpm or 0) * LEASE_FRACTION))
        want_t = max(tokens, int((key.tpm or 0) * LEASE_FRACTION))
        try:
            reply = await asyncio.wait_for(
                self._reserve(keys=[prefix], args=[key.rpm or 0, key.tpm or 0, tokens,
                                                   want_r, want_t]),
                self.timeout_s)
        except Exception as exc:
            if not connection_lost(exc):
                # A script or value error belongs to this request: it alone is refused.
                log.warning("quota check failed for key %s: %r", key.id, exc)
                raise RateLimited("The quota check failed for this request.", retry_after_s=1,
                                  code="quota_check_failed") from None
            self._skip_until = time.monotonic() + self.retry_after_s
            self._unavailable(exc)
            return None
        status, value = int(reply[0]), int(reply[1])
        if status == 0:
            redis_key = f"{prefix}:{value}"
            self._leases[key.id] = Lease(redis_key, value, int(reply[2]) - 1,
                                         int(reply[3]) - tokens)
            return Reservation(redis_key, tokens)
        kind = {1: "rpm", 2: "tpm", 3: "tpm"}[status]
        self.metrics.quota_rejections.labels(kind).inc()
        if status == 3:
            raise RateLimited(
                f"This request reserves {tokens} tokens, more than the key's limit of "
                f"{key.tpm} tokens per minute; lower max_tokens.", retry_after_s=value,
                code="tokens_exceed_limit")
        limit = key.rpm if status == 1 else key.tpm
        raise RateLimited(
            f"Rate limit reached: {limit} {'requests' if status == 1 else 'tokens'} per minute "
            f"for this key. Retry in {value} s.", retry_after_s=value)

    async def settle(self, res: Reservation | None, used_tokens: int | None) -> None:
        """Replace the reservation by the real usage (None: keep the reservation). Corrections
        are summed in memory and written every ``FLUSH_S`` seconds in one pipeline, so a request
        costs one Redis round trip, not two."""
        if res is None or used_tokens is None or self._settle is None:
            return
        delta = used_tokens - res.tokens
        if delta:
            slot = (res.redis_key, delta > 0)
            self._pending[slot] = self._pending.get(slot, 0) + delta

    async def start(self) -> None:
        if self.redis is not None:
            self._flusher = asyncio.create_task(self._flush_loop(), name="quota-settle")

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            await self.flush()

    async def flush(self) -> None:
        if not self._pending or self.redis is None or self._settle is None:
            return
        pending, self._pending = self._pending, {}
        if time.monotonic() < self._skip_until:
            return  # Redis is down: the corrections are dropped (the reservations stand)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for (key, _), delta in pending.items():
                    await self._settle(keys=[key, key.rpartition(":")[0]], args=[delta],
                                       client=pipe)
                await asyncio.wait_for(pipe.execute(), self.timeout_s * 4)
        except Exception as exc:
            if not connection_lost(exc):
                log.warning("quota settlement failed: %r", exc)
                return
            self._skip_until = time.monotonic() + self.retry_after_s
            self.metrics.quota_fail_open.inc()

    def _unavailable(self, exc: object) -> None:
        """Redis cannot be reached: serve without the check, or refuse (``fail_open``)."""
        if not self.fail_open:
            raise Overloaded("Quotas cannot be checked now (Redis is unreachable); retry.",
                             code="quota_unavailable", headers={"Retry-After": "1"})
        self.metrics.quota_fail_open.inc()
        now = time.monotonic()
        if exc is not None and now - self._last_log > 10.0:
            self._last_log = now
            log.warning("quota check skipped (fail open): Redis unavailable: %r", exc)
