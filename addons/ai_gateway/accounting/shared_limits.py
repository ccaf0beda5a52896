"""Client-key budgets and rate limits kept in Redis (`limits.store: redis://…`), so that every
worker and replica admits against the same spend.

Each decision is one Lua script, so it is atomic in the store: admitting a response checks the
key's spend plus the reservations in flight and holds its own reservation in the same step,
whatever number of gateway processes ask at once. Time is the store's clock (`TIME`), so the
processes' clocks do not matter.

Windows are kept in 60 buckets (the budget's window / 60; one second for the per-minute rates):
spend leaves a window up to one bucket late, never early. Reservations and open sessions are
leases that the process holding them renews every HEARTBEAT_SECONDS: the ones of a process that
died free themselves within LEASE_SECONDS.

Never on the relay path of a frame: a handshake, a metered request and the start of a response
wait for the store (at most `limits.store_timeout_ms`); settling usage and closing a session are
sent without waiting. While the store fails, `limits.on_store_error` admits (`open`) or refuses
(`closed`), and one line is logged when the outage starts and one when it ends. Usage that could not
be settled is owed: added up per key, and flushed as soon as the store answers anything (or, with no
traffic, within FLUSH_SECONDS). A flush names its series of owed usage and sends the series' total
so far; the store keeps, per process, the total it took of its latest series and adds only the
difference, so a flush whose reply was lost is sent again without counting twice. A settle whose
reply was lost (the store took it, then timed out) is owed too: it may count twice, not zero times.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from ai_gateway.accounting.limits import CLIENT_KEY, Refusal
from ai_gateway.accounting.metrics import GatewayMetrics
from ai_gateway.config.policy import STORE_CLOSED, Limit, LimitPolicy, RateLimits

logger = logging.getLogger(__name__)

STORE = "store"
STORE_UNAVAILABLE = "limits_store_unavailable"
LEASE_SECONDS = 90.0
HEARTBEAT_SECONDS = 30.0
CONNECT_SECONDS = 5.0
FLUSH_SECONDS = 1.0
MAX_OWED_KEYS = 10_000
FLUSHED_SECONDS = 86_400  # how long the store remembers what it took of a process's owed usage
MAX_CONNECTIONS = 8

# KEYS: spend:tokens, spend:usd, tpm, rpm, held (zset id -> lease end), held:tokens, held:usd, largest, sessions,
# flushed (process id -> 'series tokens usd' of the owed usage the store took)
# ARGV[1] = the budget window in seconds (0: no window), ARGV[2] = lease seconds; the rest per script.
_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local window = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local size = window > 0 and window / 60 or 0
local bucket = size > 0 and math.floor(now / size) or 0
local second = math.floor(now)

local function sum(key, first)
  local fields = redis.call('HGETALL', key)
  local total, oldest = 0, nil
  for i = 1, #fields, 2 do
    local b = tonumber(fields[i])
    if b < first then
      redis.call('HDEL', key, fields[i])
    else
      total = total + tonumber(fields[i + 1])
      if oldest == nil or b < oldest then oldest = b end
    end
  end
  return total, oldest
end

local function held()
  local gone = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now)
  for _, id in ipairs(gone) do
    redis.call('HDEL', KEYS[6], id)
    redis.call('HDEL', KEYS[7], id)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  local tokens, usd = 0, 0
  for _, v in ipairs(redis.call('HVALS', KEYS[6])) do tokens = tokens + tonumber(v) end
  for _, v in ipairs(redis.call('HVALS', KEYS[7])) do usd = usd + tonumber(v) end
  return tokens, usd
end

local first = size > 0 and bucket - 59 or 0
local spent_tokens, oldest = sum(KEYS[1], first)
local spent_usd = sum(KEYS[2], first)
local minute_tokens, oldest_minute = sum(KEYS[3], second - 59)
local requests, oldest_request = sum(KEYS[4], second - 59)
local held_tokens, held_usd = held()
redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', now)
local sessions = redis.call('ZCARD', KEYS[9])

local function budget_retry()
  if oldest == nil or size == 0 then return 1 end
  return math.max((oldest + 60) * size - now, 0.1)
end

local function state(verdict, code, retry)
  return {verdict, code, tostring(retry), tostring(spent_tokens + held_tokens), tostring(spent_usd + held_usd),
          tostring(requests), tostring(minute_tokens + held_tokens), tostring(sessions)}
end

-- Keys of an idle client key expire once nothing in them can count any more; only the keys a
-- script wrote are touched.
local function expire(...)
  local ttl = math.ceil(math.max(window, 60) + lease) * 1000
  for _, i in ipairs({...}) do
    if i > 2 or window > 0 then redis.call('PEXPIRE', KEYS[i], ttl) end
  end
end

local function spend(tokens, usd)
  redis.call('HINCRBY', KEYS[1], bucket, tokens)
  redis.call('HINCRBYFLOAT', KEYS[2], bucket, usd)
  redis.call('HINCRBY', KEYS[3], second, tokens)
  spent_tokens, spent_usd, minute_tokens = spent_tokens + tokens, spent_usd + usd, minute_tokens + tokens
  expire(1, 2, 3)
end

-- ARGV[3..5]: budget tokens, budget usd, requests per minute (-1: no limit)
local function over_budget()
  local tokens, usd = tonumber(ARGV[3]), tonumber(ARGV[4])
  return (tokens >= 0 and spent_tokens + held_tokens >= tokens) or (usd >= 0 and spent_usd + held_usd >= usd)
end

local function request_retry()
  return oldest_request and math.max(oldest_request + 60 - now, 0.1) or 1
end

local function over_requests()
  local rpm = tonumber(ARGV[5])
  return rpm >= 0 and requests >= rpm
end
"""

# ARGV[6] tokens per minute, ARGV[7] ticket id, ARGV[8] reservation tokens, ARGV[9] reservation usd,
# ARGV[10] 1: the reservation is at least the key's costliest response so far
ADMIT = (
    _COMMON
    + """
if over_budget() then return state('refused', 'budget_exceeded', budget_retry()) end
if over_requests() then return state('refused', 'rate_limit_exceeded', request_retry()) end
local tpm = tonumber(ARGV[6])
if tpm >= 0 and minute_tokens + held_tokens >= tpm then
  return state('refused', 'rate_limit_exceeded', oldest_minute and math.max(oldest_minute + 60 - now, 0.1) or 1)
end
local tokens, usd = tonumber(ARGV[8]), tonumber(ARGV[9])
if ARGV[10] == '1' then
  tokens = math.max(tokens, tonumber(redis.call('HGET', KEYS[8], 'tokens') or '0'))
  usd = math.max(usd, tonumber(redis.call('HGET', KEYS[8], 'usd') or '0'))
end
redis.call('ZADD', KEYS[5], now + lease, ARGV[7])
redis.call('HSET', KEYS[6], ARGV[7], tokens)
redis.call('HSET', KEYS[7], ARGV[7], usd)
redis.call('HINCRBY', KEYS[4], second, 1)
held_tokens, held_usd, requests = held_tokens + tokens, held_usd + usd, requests + 1
expire(4, 5, 6, 7)
local reply = state('admitted', '', 0)
reply[9] = tostring(tokens)
reply[10] = tostring(usd)
return reply
"""
)

# ARGV[6] concurrent sessions (-1: no limit), ARGV[7] session id
OPEN_SESSION = (
    _COMMON
    + """
if over_budget() then return state('refused', 'budget_exceeded', budget_retry()) end
local concurrent = tonumber(ARGV[6])
if concurrent >= 0 and sessions >= concurrent then return state('refused', 'rate_limit_exceeded', 1) end
if over_requests() then return state('refused', 'rate_limit_exceeded', request_retry()) end
redis.call('ZADD', KEYS[9], now + lease, ARGV[7])
redis.call('HINCRBY', KEYS[4], second, 1)
sessions, requests = sessions + 1, requests + 1
expire(4, 9)
return state('admitted', '', 0)
"""
)

# ARGV[3] ticket id ('' for none), ARGV[4] tokens, ARGV[5] usd spent
SETTLE = (
    _COMMON
    + """
if ARGV[3] ~= '' then
  held_tokens = held_tokens - tonumber(redis.call('HGET', KEYS[6], ARGV[3]) or '0')
  held_usd = held_usd - tonumber(redis.call('HGET', KEYS[7], ARGV[3]) or '0')
  redis.call('ZREM', KEYS[5], ARGV[3])
  redis.call('HDEL', KEYS[6], ARGV[3])
  redis.call('HDEL', KEYS[7], ARGV[3])
end
local tokens, usd = tonumber(ARGV[4]), tonumber(ARGV[5])
if tokens > 0 or usd > 0 then
  spend(tokens, usd)
  for field, value in pairs({tokens = tokens, usd = usd}) do
    if value > tonumber(redis.call('HGET', KEYS[8], field) or '0') then redis.call('HSET', KEYS[8], field, value) end
  end
  expire(8)
end
return state('settled', '', 0)
"""
)

# ARGV[3] process id, ARGV[4] series, ARGV[5] its tokens, ARGV[6] its usd (totals so far), ARGV[7] ms to remember.
# Only what the series grew since the store last took it counts; a late copy of an older series counts nothing.
# Not the key's largest response: owed usage is a sum of responses.
FLUSH = (
    _COMMON
    + """
local series, sent_tokens, sent_usd = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local taken_tokens, taken_usd = 0, 0
local taken = redis.call('HGET', KEYS[10], ARGV[3])
if taken then
  local s, t, u = string.match(taken, '^(%S+) (%S+) (%S+)$')
  if tonumber(s) > series then return state('flushed', '', 0) end
  if tonumber(s) == series then taken_tokens, taken_usd = tonumber(t), tonumber(u) end
end
local tokens, usd = math.max(sent_tokens - taken_tokens, 0), math.max(sent_usd - taken_usd, 0)
if tokens > 0 or usd > 0 then spend(tokens, usd) end
taken_tokens, taken_usd = math.max(sent_tokens, taken_tokens), math.max(sent_usd, taken_usd)
redis.call('HSET', KEYS[10], ARGV[3], string.format('%d %.17g %.17g', series, taken_tokens, taken_usd))
redis.call('PEXPIRE', KEYS[10], ARGV[7])
return state('flushed', '', 0)
"""
)

# ARGV[3] session id to close ('' for none), ARGV[4..]: leases of this process to renew (zset key index, id)
RENEW = (
    _COMMON
    + """
if ARGV[3] ~= '' then
  redis.call('ZREM', KEYS[9], ARGV[3])
  sessions = redis.call('ZCARD', KEYS[9])
end
for i = 4, #ARGV, 2 do
  redis.call('ZADD', KEYS[tonumber(ARGV[i])], 'XX', now + lease, ARGV[i + 1])
end
return state('renewed', '', 0)
"""
)


@dataclass(frozen=True, slots=True)
class KeyView:
    """What the store last said about a key: its budget in use (spend plus reservations), and
    requests, tokens (reservations included) and sessions of the current minute."""

    tokens: float = 0.0
    usd: float = 0.0
    requests: int = 0
    minute_tokens: float = 0.0
    sessions: int = 0


@dataclass(frozen=True, slots=True)
class Grant:
    """An admission by the store: the lease id of its reservation (None: admitted while the store
    failed, with on_store_error open) and what it holds."""

    lease: str | None
    tokens: int = 0
    usd: float = 0.0


@dataclass(slots=True)
class Owed:
    """Usage of one key the store has not taken yet (the settle failed): one per key, however
    many responses, so a long outage costs memory per key, not per response. `series` names it
    in the store, which then counts a resent total once."""

    series: int
    tokens: int = 0
    usd: float = 0.0


def _limit(value: float | None) -> str:
    return "-1" if value is None else repr(value)


def _keys(label: str) -> list[str]:
    """One hash tag per client key: every script touches one key's state, one Redis Cluster slot."""
    base = f"aigw:{{{label}}}:"
    return [
        base + name
        for name in (
            "spend:tokens",
            "spend:usd",
            "tpm",
            "rpm",
            "held",
            "held:tokens",
            "held:usd",
            "largest",
            "sessions",
            "flushed",
        )
    ]


HELD, SESSIONS = 5, 9  # 1-based positions in _keys, as RENEW's ARGV names them


class SharedLimits:
    """The key-level half of spend control against a Redis store; the session-level half (a
    session lives in one process) stays in SpendControl."""

    def __init__(self, url: str, metrics: GatewayMetrics, lease_seconds: float = LEASE_SECONDS) -> None:
        self.url = url
        self.metrics = metrics
        self.lease_seconds = lease_seconds  # renewed every HEARTBEAT_SECONDS, so larger than that
        import redis.asyncio as redis  # here: a gateway without a Redis store never loads it (9 MB)

        self.errors = (redis.RedisError, OSError, TimeoutError)
        # A bounded pool: a burst of admissions queues for a few connections instead of opening one each.
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=None, socket_connect_timeout=1.0, socket_timeout=1.0
        )
        self.client = redis.Redis(connection_pool=pool)
        self.admit_script = self.client.register_script(ADMIT)
        self.open_script = self.client.register_script(OPEN_SESSION)
        self.settle_script = self.client.register_script(SETTLE)
        self.renew_script = self.client.register_script(RENEW)
        self.flush_script = self.client.register_script(FLUSH)
        self.views: dict[str, KeyView] = {}
        self.process = uuid.uuid4().hex  # names this process's owed series in the store
        self.series = itertools.count(1)  # increasing: the store ignores a late copy of an older series
        self.owed: dict[str, Owed] = {}
        self.owed_tokens, self.owed_usd = 0, 0.0  # the sum of self.owed, kept as it changes (the gauges)
        self.owed_settings: tuple[float, LimitPolicy] = (0.0, LimitPolicy())  # window, limits: the latest settle's
        self.answered = asyncio.Event()  # the store answered an operation: time to flush
        self.flusher: asyncio.Task[None] | None = None
        self.leases: dict[str, tuple[str, int]] = {}  # lease id -> (key, HELD or SESSIONS), for renewal
        self.failing: float | None = None  # since when (perf_counter) the store has not answered
        self.tasks: set[asyncio.Task[None]] = set()
        self.heartbeat: asyncio.Task[None] | None = None

    async def admit(
        self, label: str, limits: LimitPolicy, budget: Limit | None, window: float, rates: RateLimits,
        reservation: tuple[int, float], key_largest: bool,
    ) -> Grant | Refusal:  # fmt: skip
        """A new response or request of this key: admitted with a reservation held in the store, or refused."""
        lease = uuid.uuid4().hex
        tokens, usd = reservation
        args = [*self._budget_args(window, budget, rates), _limit(rates.tokens_per_minute), lease]
        args += [str(tokens), repr(usd), "1" if key_largest else "0"]
        reply = await self._decide("admit", self.admit_script, label, args, limits, lease, HELD)
        if not isinstance(reply, list):
            return reply
        return Grant(lease, int(float(reply[8])), float(reply[9]))

    async def open_session(
        self, label: str, session_id: str, limits: LimitPolicy, budget: Limit | None, window: float, rates: RateLimits
    ) -> Grant | Refusal:
        args = [*self._budget_args(window, budget, rates), _limit(rates.concurrent_sessions), session_id]
        reply = await self._decide("open_session", self.open_script, label, args, limits, session_id, SESSIONS)
        return reply if not isinstance(reply, list) else Grant(session_id)

    async def _decide(
        self, operation: str, script: Any, label: str, args: list[str], limits: LimitPolicy, lease: str, kind: int
    ) -> list[bytes] | Grant | Refusal:
        """An admission script's reply when it admitted (its lease then renewed by this process),
        else the refusal, or what on_store_error makes of a failure."""
        reply = await self._call(operation, script, label, args, limits)
        if reply is None:
            return self._failed(limits)
        if reply[0] != b"admitted":
            return Refusal(CLIENT_KEY, reply[1].decode(), float(reply[2]))
        self.leases[lease] = (label, kind)
        return reply

    def settle(
        self, label: str, lease: str | None, tokens: int, usd: float, window: float, limits: LimitPolicy
    ) -> None:
        """Usage arrived (or a reservation is released with none): sent without waiting."""
        if lease is not None:
            self.leases.pop(lease, None)
        self._spawn(self._settle(label, lease or "", tokens, usd, window, limits))

    def close_session(self, label: str, session_id: str, window: float, limits: LimitPolicy) -> None:
        if self.leases.pop(session_id, None) is not None:
            self._spawn(self._renew(label, window, limits, session_id, []))

    def view(self, label: str) -> KeyView:
        return self.views.get(label, KeyView())

    def start(self, window: Callable[[], float], limits: Callable[[], LimitPolicy]) -> None:
        """Connect and load the scripts now (the first handshake must not pay for it), then renew
        this process's leases while it runs."""
        self.heartbeat = asyncio.get_running_loop().create_task(self._beat(window, limits))

    async def _connect(self, limits: LimitPolicy) -> None:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(CONNECT_SECONDS):
                for script in (
                    self.admit_script, self.open_script, self.settle_script, self.renew_script, self.flush_script,
                ):  # fmt: skip
                    await self.client.script_load(script.script)
        except self.errors as e:
            self._outage("connect", started, e, limits)

    async def close(self) -> None:
        """What was settled is sent (a second at most); usage still owed then is lost with the process."""
        for task in (self.heartbeat, self.flusher):
            if task is not None:
                task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, 1.0)
        await self.client.aclose()

    async def _beat(self, window: Callable[[], float], limits: Callable[[], LimitPolicy]) -> None:
        await self._connect(limits())
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            by_key: dict[str, list[str]] = {}
            for lease, (label, kind) in self.leases.items():
                by_key.setdefault(label, []).extend((str(kind), lease))
            for label, args in by_key.items():
                await self._renew(label, window(), limits(), "", args)

    async def _settle(
        self, label: str, lease: str, tokens: int, usd: float, window: float, limits: LimitPolicy
    ) -> None:
        args = [repr(window), repr(self.lease_seconds), lease, str(tokens), repr(usd)]
        if await self._call("settle", self.settle_script, label, args, limits) is None and (tokens or usd):
            self._owe(label, tokens, usd, window, limits)

    def _owe(self, label: str, tokens: int, usd: float, window: float, limits: LimitPolicy) -> None:
        """Usage the store did not take: added to the key's owed usage, flushed once the store
        answers. Past MAX_OWED_KEYS keys a new key's usage is not kept (memory stays bounded)."""
        owed = self.owed.get(label)
        if owed is None:
            if len(self.owed) >= MAX_OWED_KEYS:
                return
            owed = self.owed[label] = Owed(next(self.series))
        owed.tokens += tokens
        owed.usd += usd
        self.owed_settings = (window, limits)
        self._show_owed(tokens, usd)
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        """While usage is owed: each key's sent as soon as the store answered anything, else every
        FLUSH_SECONDS. One task, keys one at a time: never two flushes of one key in flight."""
        while self.owed:
            self.answered.clear()  # an answer from here on wakes the wait below
            for label in list(self.owed):
                if not await self._flush_key(label):
                    break
            else:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.answered.wait(), FLUSH_SECONDS)

    async def _flush_key(self, label: str) -> bool:
        """The key's owed total sent; forgotten once taken, unless it grew meanwhile (then the same
        series is sent again, and the store adds the difference). False: the store failed."""
        owed, (window, limits) = self.owed[label], self.owed_settings
        sent = (owed.tokens, owed.usd)
        if await self._call("flush", self.flush_script, label, self.flush_args(owed, window), limits) is None:
            return False
        if (owed.tokens, owed.usd) == sent:
            del self.owed[label]
            self._show_owed(-owed.tokens, -owed.usd)
        return True

    def flush_args(self, owed: Owed, window: float) -> list[str]:
        """FLUSH's arguments: the series' totals so far, named by this process and the series."""
        head = [repr(window), repr(self.lease_seconds), self.process, str(owed.series)]
        return [*head, str(owed.tokens), repr(owed.usd), str(int(FLUSHED_SECONDS * 1000))]

    def _show_owed(self, tokens: int, usd: float) -> None:
        """The owed totals changed by (tokens, usd); set, not incremented: a reload may bring new metrics."""
        self.owed_tokens += tokens
        self.owed_usd = self.owed_usd + usd if self.owed else 0.0  # no float residue once nothing is owed
        self.metrics.limits_store_owed.labels("tokens").set(self.owed_tokens)
        self.metrics.limits_store_owed.labels("usd").set(self.owed_usd)
        self.metrics.limits_store_owed_keys.set(len(self.owed))

    async def _renew(self, label: str, window: float, limits: LimitPolicy, closed: str, leases: list[str]) -> None:
        await self._call(
            "renew", self.renew_script, label, [repr(window), repr(self.lease_seconds), closed, *leases], limits
        )

    def _budget_args(self, window: float, budget: Limit | None, rates: RateLimits) -> list[str]:
        tokens = budget.tokens if budget is not None else None
        usd = budget.usd if budget is not None else None
        return [repr(window), repr(self.lease_seconds), _limit(tokens), _limit(usd), _limit(rates.requests_per_minute)]

    async def _call(
        self, operation: str, script: Any, label: str, args: list[str], limits: LimitPolicy
    ) -> list[bytes] | None:
        """One script in the store, within the policy's timeout; None when it failed (counted, and
        logged once per outage)."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(limits.store_timeout_ms / 1000):
                reply = await script(keys=_keys(label), args=args)
        except self.errors as e:
            self._outage(operation, started, e, limits)
            return None
        self.metrics.limits_store_duration.labels(operation).observe(time.perf_counter() - started)
        self.answered.set()
        # Only a call made after the outage began ends it: one sent before (its reply already on its
        # way when the store went) would log the end of an outage that is still going on.
        if self.failing is not None and started > self.failing:
            self.failing = None
            logger.warning("ai-gateway: limits store %s answers again", self.url)
        self.views[label] = KeyView(
            float(reply[3]), float(reply[4]), int(float(reply[5])), float(reply[6]), int(reply[7])
        )
        return reply

    def _outage(self, operation: str, started: float, error: BaseException, limits: LimitPolicy) -> None:
        """A failed operation: counted, and logged once per outage (not per response)."""
        self.metrics.limits_store_duration.labels(operation).observe(time.perf_counter() - started)
        self.metrics.limits_store_errors.labels(operation).inc()
        if self.failing is None:
            self.failing = time.perf_counter()
            logger.error(
                "ai-gateway: limits store %s failed (%s): on_store_error=%s until it answers again",
                self.url, describe(error), limits.on_store_error,
            )  # fmt: skip

    @staticmethod
    def _failed(limits: LimitPolicy) -> Grant | Refusal:
        if limits.on_store_error == STORE_CLOSED:
            return Refusal(STORE, STORE_UNAVAILABLE, 1.0)
        return Grant(None)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def describe(error: BaseException) -> str:
    """A store error in a few words, for the one line logged per outage."""
    if isinstance(error, TimeoutError):
        return "timed out"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
