"""What the gateway processes of one deployment share through Redis about the replicas.

- **Adapter placement**: the first load of a version claims one replica for it in Redis
  (``tunegate:placement:<ref>`` = ``<replica url>|<claimant>``, set only if absent, expiring after
  the load timeout). Another gateway process about to load the same version finds the claim and
  routes to that replica, waiting for the claimant's load instead of loading it elsewhere or a
  second time. Once loaded the claim is marked done and kept ``done_ttl_s`` (longer than a health
  round, by when every gateway sees the holder in ``/v1/models``); a failed load drops it. A
  claim on a replica this gateway sees as down is taken over (compare-and-set, so two gateways
  never both take it over).
- **Replicas down**: a gateway that fails to reach a replica publishes its URL on
  ``tunegate:replica-down``; every other gateway marks that replica down at once, so a dead
  replica costs at most one failed attempt per deployment rather than one per gateway and health
  round. Re-admission is the health check's (``GET /health`` answering 200 again).

Redis failures never fail a request: without an answer the gateway routes on its own view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import Any

log = logging.getLogger("tunegate.gateway.placement")

DOWN_CHANNEL = "tunegate:replica-down"
CLAIM_KEY = "tunegate:placement:{ref}"
DONE = "done"

# Set KEYS[1] to ARGV[1] (for ARGV[3] ms) when absent or still equal to ARGV[2] (a claim being
# taken over); returns the value it holds afterwards.
_CLAIM = """
local v = redis.call('GET', KEYS[1])
if (not v) or (ARGV[2] ~= '' and v == ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return ARGV[1]
end
return v
"""
# Replace KEYS[1]'s value ARGV[1] by ARGV[2] (ARGV[3] ms), or delete it when ARGV[2] is empty.
_SWAP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
  return 1
end
return 0
"""


class Placement:
    def __init__(self, redis: Any, *, subscriber: Any | None = None, claim_ttl_s: float = 130.0,
                 done_ttl_s: float = 30.0) -> None:
        self.redis = redis
        self.subscriber = subscriber  # a client without a read timeout, for the channel
        self.token = secrets.token_hex(6)  # this gateway process
        self.claim_ttl_ms = int(claim_ttl_s * 1000)
        self.done_ttl_ms = int(done_ttl_s * 1000)
        self._claim = redis.register_script(_CLAIM)
        self._swap = redis.register_script(_SWAP)
        self._task: asyncio.Task[None] | None = None

    def mine(self, url: str) -> str:
        return f"{url}|{self.token}"

    async def claim(self, ref: str, url: str, alive: set[str]) -> tuple[str, bool] | None:
        """The replica holding ``ref``'s claim (claiming ``url`` when none does, or when the
        claimed one is not in ``alive``) and whether this process is to load it there (False:
        another gateway is loading it, or has loaded it); None when Redis does not answer."""
        key, mine = CLAIM_KEY.format(ref=ref), self.mine(url)
        try:
            held = _text(await self._claim(keys=[key], args=[mine, "", self.claim_ttl_ms]))
            if held.split("|", 1)[0] not in alive:
                held = _text(await self._claim(keys=[key], args=[mine, held, self.claim_ttl_ms]))
        except Exception as exc:  # Redis down or slow: route on this process's own view
            log.warning("placement claim for %s failed: %s", ref, exc)
            return None
        owner, _, who = held.partition("|")
        return owner, who == self.token

    async def claim_state(self, ref: str) -> str | None:
        """The claim's raw value (None: no claim, or Redis did not answer)."""
        try:
            raw = await self.redis.get(CLAIM_KEY.format(ref=ref))
        except Exception:
            return None
        return None if raw is None else _text(raw)

    async def settle(self, ref: str, url: str, loaded: bool) -> None:
        """After this process's load on ``url``: mark the claim done, or drop it (failed)."""
        new = f"{url}|{DONE}" if loaded else ""
        with contextlib.suppress(Exception):
            await self._swap(keys=[CLAIM_KEY.format(ref=ref)],
                             args=[self.mine(url), new, self.done_ttl_ms])

    # ---- replicas down -----------------------------------------------------------------------
    async def report_down(self, url: str) -> None:
        try:
            await self.redis.publish(DOWN_CHANNEL, self.mine(url))
        except Exception as exc:
            log.warning("publishing %s down failed: %s", url, exc)

    def start(self, on_down: Callable[[str], None]) -> None:
        if self.subscriber is not None:
            self._task = asyncio.create_task(self._listen(on_down), name="replica-down")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.subscriber is not None:
            await self.subscriber.aclose()

    async def _listen(self, on_down: Callable[[str], None]) -> None:
        assert self.subscriber is not None
        while True:
            try:
                async with self.subscriber.pubsub(ignore_subscribe_messages=True) as ps:
                    await ps.subscribe(DOWN_CHANNEL)
                    async for msg in ps.listen():
                        url, _, who = _text(msg.get("data", b"")).partition("|")
                        if who != self.token:
                            on_down(url)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: subscribe again a little later
                log.warning("replica-down channel: %s", exc)
                await asyncio.sleep(1.0)


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)
