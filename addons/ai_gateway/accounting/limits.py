"""Budgets and rate limits, enforced on every path that creates spend, with reservations so that
concurrency cannot multiply a budget.

A response (or an HTTP request) is admitted only while what is spent plus what the responses
already in flight may still cost leaves headroom; admitting it reserves its own share, which its
usage replaces when it arrives (`settle`). Without reservations, N concurrent responses each see
the spend before any of them finished and all pass: a budget of 1 would let N through.

The reservation of a response is the larger of the policy's `budgets.reserve` and the largest
response settled so far in the same scope (the session, or the client key), so it follows what
responses of that workload really cost. Spend therefore stays within the limit plus about one
response, plus whatever in-flight responses cost beyond their reservation.

Client keys are identified by what the policy calls them (a known key's name), else a 16-hex
digest of their SHA-256, else `anonymous`: clients without a key share one identity and its
limits, they are never unlimited.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ai_gateway.config.policy import (
    DEFAULT_RESERVE,
    BudgetPolicy,
    ClientKeys,
    Limit,
    LimitPolicy,
    RateLimits,
)

SESSION = "session"
CLIENT_KEY = "client_key"
BUDGET_EXCEEDED = "budget_exceeded"
RATE_LIMITED = "rate_limit_exceeded"
ANONYMOUS = "anonymous"
MINUTE = 60.0
MAX_IDLE_KEYS = 10_000  # client keys held before idle ones are forgotten


def client_key_sha256(key: str) -> str:
    """What a policy names a client key by: its SHA-256, never the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def client_key_digest(key: str) -> str:
    """What the gateway shows of an unknown client's credential: enough to tell keys apart, not to use one."""
    return client_key_sha256(key)[:16]


@dataclass(frozen=True, slots=True)
class Identity:
    """Who spends: the label shown in metrics and the ledger, and the limits that apply to it."""

    label: str
    known: bool = False


def identify(client_keys: ClientKeys, sha256: str | None) -> Identity:
    """The identity of a client presenting a key with this SHA-256 (None: no key at all)."""
    if sha256 is None:
        return Identity(ANONYMOUS)
    known = client_keys.find(sha256)
    return Identity(known.name, True) if known else Identity(sha256[:16])


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a response, request or session is refused; retry_after in seconds where waiting helps."""

    scope: str
    code: str
    retry_after: float | None = None


@dataclass
class Ticket:
    """An admitted response or request and what it holds against its scopes until settled."""

    key: str
    session: str | None
    tokens: int
    usd: float
    open: bool = True
    lease: str | None = None  # its reservation's lease in a shared store (limits.store: redis://)


class Window:
    """Tokens and USD spent within a rolling window (None: since the start), and their sum now."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.entries: deque[tuple[float, int, float]] = deque()
        self.tokens = 0
        self.usd = 0.0

    def add(self, now: float, tokens: int, usd: float) -> None:
        self.tokens += tokens
        self.usd += usd
        if self.seconds is not None:
            self.entries.append((now, tokens, usd))

    def add_older(self, at: float, tokens: int, usd: float) -> None:
        """Spend from before every entry held (a ledger read back newest first, at startup)."""
        self.tokens += tokens
        self.usd += usd
        if self.seconds is not None:
            self.entries.appendleft((at, tokens, usd))

    def expire(self, now: float) -> None:
        if self.seconds is None:
            return
        while self.entries and self.entries[0][0] <= now - self.seconds:
            _, tokens, usd = self.entries.popleft()
            self.tokens -= tokens
            self.usd -= usd
        if not self.entries:
            self.tokens, self.usd = 0, 0.0  # no rounding error survives an empty window

    def retry_after(self, now: float) -> float | None:
        return self.entries[0][0] + self.seconds - now if self.entries and self.seconds else None


@dataclass
class Scope:
    """Spend and reservations of one session or one client key."""

    spend: Window
    reserved_tokens: int = 0
    reserved_usd: float = 0.0
    largest: tuple[int, float] = (0, 0.0)  # the costliest response settled so far

    def headroom(self, limit: Limit | None) -> bool:
        """Whether anything more may start: spend and reservations both below the limit, per unit."""
        if limit is None:
            return True
        tokens_ok = limit.tokens is None or self.spend.tokens + self.reserved_tokens < limit.tokens
        usd_ok = limit.usd is None or self.spend.usd + self.reserved_usd < limit.usd
        return tokens_ok and usd_ok

    def remaining(self, limit: Limit) -> tuple[float | None, float | None]:
        tokens = None if limit.tokens is None else max(limit.tokens - self.spend.tokens - self.reserved_tokens, 0)
        usd = None if limit.usd is None else max(limit.usd - self.spend.usd - self.reserved_usd, 0.0)
        return tokens, usd

    def retry_after(self, now: float) -> float:
        """When spend leaves the window; when only reservations stand in the way, about when
        responses in flight finish (a second is a fair guess for a client's retry)."""
        return self.spend.retry_after(now) or 1.0

    def reservation(self, reserve: Limit) -> tuple[int, float]:
        return max(reserve.tokens or 0, self.largest[0]), max(reserve.usd or 0.0, self.largest[1])

    def hold(self, tokens: int, usd: float) -> None:
        self.reserved_tokens += tokens
        self.reserved_usd += usd

    def settle(self, ticket: Ticket | None, now: float, tokens: int, usd: float) -> None:
        if ticket is not None:
            self.reserved_tokens -= ticket.tokens
            self.reserved_usd -= ticket.usd
        self.spend.add(now, tokens, usd)
        self.largest = (max(self.largest[0], tokens), max(self.largest[1], usd))


@dataclass
class KeyState:
    budget: Scope
    minute: Scope  # tokens per minute: a scope of its own, reservations included
    requests: deque[float] = field(default_factory=deque)
    sessions: set[str] = field(default_factory=set)


class SpendControl:
    """Admission and settlement against the policy's budgets and limits; state kept across reloads."""

    def __init__(self, budgets: BudgetPolicy | None, limits: LimitPolicy, client_keys: ClientKeys) -> None:
        self.sessions: dict[str, Scope] = {}
        self.keys: dict[str, KeyState] = {}
        self.forget_at = MAX_IDLE_KEYS  # how many keys are held when idle ones are next forgotten
        self.update(budgets, limits, client_keys)

    def update(self, budgets: BudgetPolicy | None, limits: LimitPolicy, client_keys: ClientKeys) -> None:
        """A new policy: new limits apply at once, spend already counted stays."""
        self.budgets = budgets
        self.limits = limits
        self.client_keys = client_keys
        self.known = {known.name: known for known in client_keys.keys}
        for state in self.keys.values():
            state.budget.spend.seconds = budgets.window_seconds if budgets else None

    @property
    def keys_shared(self) -> bool:
        """Client-key budgets and limits live in a shared store (SharedLimits); only sessions' are here."""
        return self.limits.shared

    @property
    def window(self) -> float:
        """The client-key budget window in seconds (without budgets, a minute: only rates need spend)."""
        return self.budgets.window_seconds if self.budgets else MINUTE

    def reservation(self, session_id: str | None) -> tuple[int, float]:
        """What a new response of this session (or a request, None) reserves before the key's own
        costliest response is considered (the shared store adds that one itself)."""
        if session_id is None:
            return self.reserve.tokens or 0, self.reserve.usd or 0.0
        return self.session(session_id).reservation(self.reserve)

    @property
    def reserve(self) -> Limit:
        return self.budgets.reserve if self.budgets else DEFAULT_RESERVE

    def key_budget(self, label: str) -> Limit | None:
        known = self.known.get(label)
        if known is not None and known.budget is not None:
            return known.budget
        return self.budgets.client_key if self.budgets else None

    def rate_limits(self, label: str) -> RateLimits:
        known = self.known.get(label)
        return self.limits.client_key.over(known.limits if known else None)

    def key(self, label: str, now: float) -> KeyState:
        state = self.keys.get(label)
        if state is None:
            if len(self.keys) >= self.forget_at:
                self._forget_idle(now)
            window = self.budgets.window_seconds if self.budgets else None
            state = self.keys[label] = KeyState(Scope(Window(window)), Scope(Window(MINUTE)))
        state.budget.spend.expire(now)
        state.minute.spend.expire(now)
        while state.requests and state.requests[0] <= now - MINUTE:
            state.requests.popleft()
        return state

    def _forget_idle(self, now: float) -> None:
        """Keys with nothing in their windows, in flight or open cost nothing to forget.

        The next scan waits until the keys held have doubled (or reach MAX_IDLE_KEYS): each scan is
        paid for by as many new keys, so many active keys (a restart restoring 100,000) cost time
        linear in their number, not a scan per new key; at most twice the active keys are held."""
        for label in [label for label, state in self.keys.items() if self._idle(state, now)]:
            del self.keys[label]
        self.forget_at = max(MAX_IDLE_KEYS, 2 * len(self.keys))

    @staticmethod
    def _idle(state: KeyState, now: float) -> bool:
        state.budget.spend.expire(now)
        while state.requests and state.requests[0] <= now - MINUTE:  # as key() prunes them
            state.requests.popleft()
        budget = state.budget
        return not (
            budget.spend.entries or budget.reserved_tokens or budget.reserved_usd or state.sessions or state.requests
        )

    def session(self, session_id: str) -> Scope:
        scope = self.sessions.get(session_id)
        if scope is None:
            scope = self.sessions[session_id] = Scope(Window(None))
        return scope

    def admit(self, label: str, session_id: str | None, now: float) -> Ticket | Refusal:
        """A new response or request: admitted with a reservation, or refused with the reason."""
        refusal = self.refusal(label, session_id, now)
        if refusal is not None:
            return refusal
        session = self.session(session_id) if session_id is not None else None
        if self.keys_shared:
            raise RuntimeError("a shared store admits client keys: use admit_shared")
        state = self.key(label, now)
        tokens, usd = (session or state.budget).reservation(self.reserve)
        for scope in (state.budget, state.minute, session):
            if scope is not None:
                scope.hold(tokens, usd)
        state.requests.append(now)
        return Ticket(label, session_id, tokens, usd)

    def admitted_shared(self, label: str, session_id: str | None, lease: str | None, held: tuple[int, float]) -> Ticket:
        """The shared store admitted the key's response and holds `held` for it: the session holds the same."""
        if session_id is not None:
            self.session(session_id).hold(*held)
        return Ticket(label, session_id, *held, lease=lease)

    def refusal(self, label: str, session_id: str | None, now: float) -> Refusal | None:
        """Why a new response or request would be refused now, if it would be; nothing is held.
        With a shared store, only the session's budget is checked here."""
        session = self.session(session_id) if session_id is not None else None
        budgets = self.budgets
        if session is not None and budgets is not None and not session.headroom(budgets.session):
            return Refusal(SESSION, BUDGET_EXCEEDED)
        if self.keys_shared:
            return None
        state = self.key(label, now)
        if not state.budget.headroom(self.key_budget(label)):
            return Refusal(CLIENT_KEY, BUDGET_EXCEEDED, state.budget.retry_after(now))
        limits = self.rate_limits(label)
        if limits.requests_per_minute is not None and len(state.requests) >= limits.requests_per_minute:
            return Refusal(CLIENT_KEY, RATE_LIMITED, state.requests[0] + MINUTE - now)
        if not state.minute.headroom(Limit(tokens=limits.tokens_per_minute)):
            return Refusal(CLIENT_KEY, RATE_LIMITED, state.minute.retry_after(now))
        return None

    def settle(
        self, ticket: Ticket | None, label: str, session_id: str | None, now: float, tokens: int, usd: float
    ) -> None:
        """Usage arrived: the ticket's reservation (if any) gives way to what was really spent."""
        held = ticket if ticket is not None and ticket.open else None
        if held is not None:
            held.open = False
        if not self.keys_shared:
            state = self.key(label, now)
            state.budget.settle(held, now, tokens, usd)
            state.minute.settle(held, now, tokens, usd)
        if session_id is not None and (session_id in self.sessions or tokens or usd):
            self.session(session_id).settle(held, now, tokens, usd)  # spend without an admission counts too

    def release(self, ticket: Ticket, now: float) -> None:
        """The response never came (refused upstream, session closed): its reservation is freed."""
        self.settle(ticket, ticket.key, ticket.session, now, 0, 0.0)

    def restore(self, records: Iterable[Mapping[str, Any]], age: Callable[[Any], float], now: float) -> int:
        """Spend a restart must not forgive: ledger records (newest first) of the current window
        charged again to their client keys, `age` seconds ago each. Returns how many were restored."""
        window = self.budgets.window_seconds if self.budgets else MINUTE
        restored = 0
        for record in records:
            seconds = age(record["time"])
            if seconds >= max(window, MINUTE):
                break
            tokens = (record.get("input_tokens") or 0) + (record.get("output_tokens") or 0)
            usd = record.get("cost_usd") or 0.0
            label = record.get("client_key")
            if not isinstance(label, str) or type(tokens) is not int or not isinstance(usd, (int, float)):
                continue
            self.key(label, now).budget.spend.add_older(now - seconds, tokens, usd)
            restored += 1
        for state in self.keys.values():
            state.budget.spend.expire(now)
        return restored

    def open_session(self, label: str, session_id: str, now: float) -> Refusal | None:
        """A WebSocket handshake: refused when the key is over budget or at its session limit."""
        state = self.key(label, now)
        if not state.budget.headroom(self.key_budget(label)):
            return Refusal(CLIENT_KEY, BUDGET_EXCEEDED, state.budget.retry_after(now))
        limits = self.rate_limits(label)
        if limits.concurrent_sessions is not None and len(state.sessions) >= limits.concurrent_sessions:
            return Refusal(CLIENT_KEY, RATE_LIMITED)
        if limits.requests_per_minute is not None and len(state.requests) >= limits.requests_per_minute:
            return Refusal(CLIENT_KEY, RATE_LIMITED, state.requests[0] + MINUTE - now)
        state.sessions.add(session_id)
        state.requests.append(now)
        return None

    def close_session(self, label: str, session_id: str) -> None:
        state = self.keys.get(label) if not self.keys_shared else None
        if state is not None:
            state.sessions.discard(session_id)
        self.sessions.pop(session_id, None)

    def remaining(self, label: str, now: float) -> tuple[float | None, float | None]:
        limit = self.key_budget(label)
        if limit is None:
            return None, None
        return self.key(label, now).budget.remaining(limit)

    def headroom(self, label: str, now: float) -> dict[str, float]:
        """What is left of each rate limit of the key now, for the headroom gauge."""
        limits, state = self.rate_limits(label), self.key(label, now)
        left: dict[str, float] = {}
        if limits.requests_per_minute is not None:
            left["requests_per_minute"] = max(limits.requests_per_minute - len(state.requests), 0)
        if limits.tokens_per_minute is not None:
            used = state.minute.spend.tokens + state.minute.reserved_tokens
            left["tokens_per_minute"] = max(limits.tokens_per_minute - used, 0)
        if limits.concurrent_sessions is not None:
            left["concurrent_sessions"] = max(limits.concurrent_sessions - len(state.sessions), 0)
        return left
