"""Budget arithmetic: per session, per client key over a rolling window."""

import pytest

from ai_gateway.accounting.budget import CLIENT_KEY, SESSION, Budgets, client_key_digest
from ai_gateway.config.policy import BudgetPolicy, Limit


def test_session_budget_is_per_session():
    budgets = Budgets(BudgetPolicy(session=Limit(tokens=100)))
    budgets.charge("s1", None, 60, 0.0, now=0)
    assert budgets.exhausted("s1", None, now=0) is None
    budgets.charge("s1", None, 40, 0.0, now=1)
    assert budgets.exhausted("s1", None, now=1) == SESSION
    assert budgets.exhausted("s2", None, now=1) is None
    budgets.end_session("s1")
    assert budgets.exhausted("s1", None, now=1) is None


def test_client_key_budget_rolls_over_its_window():
    budgets = Budgets(BudgetPolicy(client_key=Limit(usd=1.0), window_seconds=60))
    budgets.charge("s1", "k", 10, 0.6, now=0)
    budgets.charge("s2", "k", 10, 0.5, now=30)
    assert budgets.exhausted("s3", "k", now=31) == CLIENT_KEY
    assert budgets.remaining("k", now=31) == (None, 0.0)
    # the first charge leaves the window at t=60; 0.5 of 1.0 spent
    assert budgets.exhausted("s3", "k", now=61) is None
    assert budgets.remaining("k", now=61) == (None, pytest.approx(0.5))
    assert budgets.exhausted("s3", "other", now=61) is None


def test_either_unit_exhausts():
    budgets = Budgets(BudgetPolicy(session=Limit(tokens=1000, usd=0.01)))
    budgets.charge("s", None, 10, 0.02, now=0)
    assert budgets.exhausted("s", None, now=0) == SESSION


def test_digest_is_not_the_key():
    digest = client_key_digest("sk-secret")
    assert len(digest) == 16 and "secret" not in digest
    assert digest == client_key_digest("sk-secret") != client_key_digest("sk-other")
