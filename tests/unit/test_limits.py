"""Admission arithmetic: reservations, budgets per session and per client key, rate limits, identities."""

import pytest

from ai_gateway.accounting.limits import (
    ANONYMOUS,
    BUDGET_EXCEEDED,
    CLIENT_KEY,
    RATE_LIMITED,
    SESSION,
    Refusal,
    SpendControl,
    Ticket,
    client_key_digest,
    client_key_sha256,
    identify,
)
from ai_gateway.config.policy import BudgetPolicy, ClientKeys, KnownKey, Limit, LimitPolicy, RateLimits

TEAM = KnownKey(
    client_key_sha256("sk-team"), "team", budget=Limit(tokens=10_000), limits=RateLimits(concurrent_sessions=5)
)


def control(budgets=None, limits=None, keys=(TEAM,)) -> SpendControl:
    return SpendControl(budgets, LimitPolicy(client_key=limits or RateLimits()), ClientKeys(keys=keys))


def test_concurrent_responses_cannot_multiply_a_budget():
    """Without reservations every one of them would see 0 spent and pass."""
    spend = control(BudgetPolicy(client_key=Limit(tokens=1000), reserve=Limit(tokens=300)))
    admitted = [spend.admit("k", None, now=0) for _ in range(10)]
    tickets = [t for t in admitted if isinstance(t, Ticket)]
    assert len(tickets) == 4  # 0, 300, 600, 900 are below 1000; 1200 is not
    assert all(r == Refusal(CLIENT_KEY, BUDGET_EXCEEDED, 1.0) for r in admitted[4:])  # once in-flight ones finish
    for ticket in tickets:
        spend.settle(ticket, "k", None, 1, 250, 0.0)
    assert spend.remaining("k", now=1) == (0, None)  # 1000 spent of 1000
    assert isinstance(spend.admit("k", None, now=1), Refusal)


def test_settling_replaces_the_reservation_and_releasing_frees_it():
    spend = control(BudgetPolicy(client_key=Limit(tokens=1000), reserve=Limit(tokens=400)))
    first, second = spend.admit("k", None, 0), spend.admit("k", None, 0)
    assert isinstance(first, Ticket) and isinstance(second, Ticket)
    assert spend.remaining("k", 0) == (200, None)
    spend.settle(first, "k", None, 0, 100, 0.0)
    assert spend.remaining("k", 0) == (500, None)
    spend.release(second, 0)
    spend.release(second, 0)  # twice changes nothing
    assert spend.remaining("k", 0) == (900, None)


def test_reservations_follow_the_costliest_response_of_the_session():
    spend = control(BudgetPolicy(session=Limit(tokens=10_000), reserve=Limit(tokens=100)))
    ticket = spend.admit("k", "s1", 0)
    assert isinstance(ticket, Ticket) and ticket.tokens == 100
    spend.settle(ticket, "k", "s1", 0, 3000, 0.0)
    assert spend.admit("k", "s1", 0).tokens == 3000
    assert spend.admit("k", "s2", 0).tokens == 100  # another session learns nothing from s1


def test_session_budget_refuses_only_its_session():
    spend = control(BudgetPolicy(session=Limit(tokens=100), reserve=Limit(tokens=1)))
    ticket = spend.admit("k", "s1", 0)
    spend.settle(ticket, "k", "s1", 0, 100, 0.0)
    assert spend.admit("k", "s1", 0) == Refusal(SESSION, BUDGET_EXCEEDED)
    assert isinstance(spend.admit("k", "s2", 0), Ticket)
    spend.close_session("k", "s1")
    assert "s1" not in spend.sessions


def test_http_exchanges_hold_no_session_state():
    """One HTTP request is not a session: a million of them must not leave state behind."""
    spend = control(BudgetPolicy(session=Limit(tokens=100)))
    for _ in range(1000):
        spend.settle(spend.admit("k", None, 0), "k", None, 0, 1, 0.0)
    assert spend.sessions == {}


def test_client_key_budget_rolls_over_its_window_and_says_when_to_retry():
    spend = control(BudgetPolicy(client_key=Limit(usd=1.0), window_seconds=60, reserve=Limit(usd=0.01)))
    spend.settle(None, "k", None, 0, 10, 0.6)
    spend.settle(None, "k", None, 30, 10, 0.5)
    refusal = spend.admit("k", None, 31)
    assert refusal == Refusal(CLIENT_KEY, BUDGET_EXCEEDED, pytest.approx(29))
    assert isinstance(spend.admit("k", None, 61), Ticket)  # the first charge left the window at t=60


def test_requests_and_tokens_per_minute():
    spend = control(limits=RateLimits(requests_per_minute=3, tokens_per_minute=1000))
    for now in (0, 10, 20):
        spend.settle(spend.admit("k", None, now), "k", None, now, 10, 0.0)
    refusal = spend.admit("k", None, 30)
    assert refusal == Refusal(CLIENT_KEY, RATE_LIMITED, pytest.approx(30))
    assert isinstance(spend.admit("k", None, 60.5), Ticket)
    spend.settle(None, "k", None, 61, 2000, 0.0)
    assert spend.admit("other", None, 61) != spend.admit("k", None, 61)
    assert spend.admit("k", None, 61).code == RATE_LIMITED


def test_concurrent_sessions_and_known_key_overrides():
    spend = control(limits=RateLimits(concurrent_sessions=1))
    assert spend.open_session("k", "a", 0) is None
    assert spend.open_session("k", "b", 0) == Refusal(CLIENT_KEY, RATE_LIMITED)
    spend.close_session("k", "a")
    assert spend.open_session("k", "b", 0) is None
    # the known key's own limit (5) and budget (10,000 tokens) replace the defaults
    assert all(spend.open_session("team", f"t{i}", 0) is None for i in range(5))
    assert spend.open_session("team", "t5", 0) is not None
    assert spend.remaining("team", 0) == (10_000, None)


def test_new_limits_apply_at_once_and_spend_is_kept():
    spend = control(BudgetPolicy(client_key=Limit(tokens=100)))
    spend.settle(None, "k", None, 0, 90, 0.0)
    spend.update(BudgetPolicy(client_key=Limit(tokens=50)), LimitPolicy(), ClientKeys())
    assert spend.admit("k", None, 0) == Refusal(CLIENT_KEY, BUDGET_EXCEEDED, pytest.approx(3600))


def test_identities_never_hold_the_key():
    keys = ClientKeys(keys=(TEAM,))
    assert identify(keys, None).label == ANONYMOUS
    assert identify(keys, client_key_sha256("sk-team")).label == "team"
    unknown = identify(keys, client_key_sha256("sk-secret"))
    assert unknown.label == client_key_digest("sk-secret") and "secret" not in unknown.label and not unknown.known
    assert len(client_key_sha256("sk-secret")) == 64


def test_restoring_many_client_keys_scans_each_a_bounded_number_of_times(monkeypatch):
    """Forgetting idle keys checks at most about twice as many keys as were ever created (one scan
    per new key past 10,000 was quadratic: restoring 20,000 keys took 146 s). The restored keys
    are forgotten once their window has passed."""
    keys = 20_000
    checks = 0
    idle = SpendControl._idle

    def counted(state, now: float) -> bool:
        nonlocal checks
        checks += 1
        assert checks <= 4 * keys, "idle keys are looked for on every new key"  # fails fast, not in hours
        return idle(state, now)

    monkeypatch.setattr(SpendControl, "_idle", staticmethod(counted))
    spend = control(BudgetPolicy(client_key=Limit(tokens=100)))
    records = ({"time": 1 + i / keys, "client_key": f"k{i}", "input_tokens": 10} for i in range(keys))
    assert spend.restore(records, lambda seconds: seconds, now=10) == keys
    assert len(spend.keys) == keys and spend.remaining("k0", now=10) == (90, None)
    assert checks <= keys
    for i in range(keys):
        assert isinstance(spend.admit(f"new{i}", None, now=3700), Ticket)  # the restored keys' window is over
    assert "k0" not in spend.keys and len(spend.keys) == keys
    print(f"{2 * keys} keys created, {checks} idle checks")
    assert checks <= 2 * (2 * keys)


def test_a_key_holding_only_a_usd_reservation_is_not_forgotten_as_idle():
    """A response in flight on a USD-only budget holds no token reservation: forgetting its key as
    idle would drop the reservation, and a burst of new keys could then free a spent budget."""
    spend = control(BudgetPolicy(client_key=Limit(usd=1.0), reserve=Limit(usd=1.0)))
    ticket = spend.admit("k", None, now=0)
    assert isinstance(ticket, Ticket)
    spend.forget_at = 1  # the next new key looks for idle ones
    spend.admit("other", None, now=120)  # the request minute is over, the response still in flight
    assert "k" in spend.keys
    assert isinstance(spend.admit("k", None, now=120), Refusal)  # the budget is all reserved while it is held


def test_keys_whose_request_minute_is_over_are_forgotten_when_idle():
    spend = control(limits=RateLimits(requests_per_minute=10))
    spend.release(spend.admit("k", None, now=0), now=1)
    spend.forget_at = 1
    spend.admit("other", None, now=120)
    assert "k" not in spend.keys
