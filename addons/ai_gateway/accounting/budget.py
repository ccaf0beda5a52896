"""Token and USD budgets, per session and per client key over a rolling window, enforced live.

A Realtime session that is already open can run past any budget checked only at the handshake,
so spend is charged as each response finishes and checked again before each new response.
Client keys are only ever held as a short SHA-256 digest.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field

from ai_gateway.config.policy import BudgetPolicy, Limit

SESSION = "session"
CLIENT_KEY = "client_key"
MAX_IDLE_KEYS = 10_000


def client_key_digest(key: str) -> str:
    """What the gateway keeps of a client's credential: enough to tell keys apart, not to use one."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class Spend:
    """Tokens and USD spent, optionally only those within a rolling window."""

    window: float | None = None
    tokens: int = 0
    usd: float = 0.0
    entries: deque[tuple[float, int, float]] = field(default_factory=deque)

    def add(self, now: float, tokens: int, usd: float) -> None:
        self.tokens += tokens
        self.usd += usd
        if self.window is not None:
            self.entries.append((now, tokens, usd))

    def expire(self, now: float) -> None:
        while self.entries and self.entries[0][0] <= now - (self.window or 0):
            _, tokens, usd = self.entries.popleft()
            self.tokens -= tokens
            self.usd -= usd
        if self.window is not None and not self.entries:
            self.usd = 0.0  # no rounding error survives an empty window

    def remaining(self, limit: Limit) -> tuple[float | None, float | None]:
        tokens = None if limit.tokens is None else max(limit.tokens - self.tokens, 0)
        usd = None if limit.usd is None else max(limit.usd - self.usd, 0.0)
        return tokens, usd

    def exceeds(self, limit: Limit) -> bool:
        return (limit.tokens is not None and self.tokens >= limit.tokens) or (
            limit.usd is not None and self.usd >= limit.usd
        )


class Budgets:
    """Spend per session and per client key, against the policy's limits."""

    def __init__(self, policy: BudgetPolicy) -> None:
        self.policy = policy
        self.sessions: dict[str, Spend] = {}
        self.client_keys: dict[str, Spend] = {}

    def charge(self, session: str | None, client_key: str | None, tokens: int, usd: float, now: float) -> None:
        if len(self.client_keys) > MAX_IDLE_KEYS:  # keys whose window emptied cost nothing to forget
            self.client_keys = {k: s for k, s in self.client_keys.items() if s.expire(now) or s.entries}
        if session is not None and self.policy.session is not None:
            self.sessions.setdefault(session, Spend()).add(now, tokens, usd)
        if client_key is not None and self.policy.client_key is not None:
            self.key_spend(client_key, now).add(now, tokens, usd)

    def key_spend(self, client_key: str, now: float) -> Spend:
        spend = self.client_keys.get(client_key)
        if spend is None:
            spend = self.client_keys[client_key] = Spend(window=self.policy.window_seconds)
        spend.expire(now)
        return spend

    def exhausted(self, session: str | None, client_key: str | None, now: float) -> str | None:
        """The scope whose budget is used up (session first), or None when more spend is allowed."""
        policy = self.policy
        if policy.session is not None and session in self.sessions and self.sessions[session].exceeds(policy.session):
            return SESSION
        key_limit = policy.client_key
        if key_limit is not None and client_key is not None and self.key_spend(client_key, now).exceeds(key_limit):
            return CLIENT_KEY
        return None

    def remaining(self, client_key: str, now: float) -> tuple[float | None, float | None]:
        if self.policy.client_key is None:
            return None, None
        return self.key_spend(client_key, now).remaining(self.policy.client_key)

    def end_session(self, session: str) -> None:
        self.sessions.pop(session, None)


def update_budgets(budgets: Budgets | None, policy: BudgetPolicy | None) -> Budgets | None:
    """New limits keep the spend already counted; no budgets in the policy drops the state."""
    if policy is None:
        return None
    if budgets is None:
        return Budgets(policy)
    budgets.policy = policy
    return budgets
