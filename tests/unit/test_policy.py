"""Policy loading, validation messages and agentgateway's route matching."""

import time
from pathlib import Path

import pytest

from ai_gateway.accounting.pricing import catalog_for
from ai_gateway.config.policy import (
    DEFAULT_POLICY,
    NO_MATCH,
    HeaderPolicy,
    PolicyError,
    RouteType,
    load_policy,
    parse_policy,
)

from ..clients import write_padded

POLICIES = Path(__file__).resolve().parents[2] / "policies"


def parse(text: str, environ: dict[str, str] | None = None):
    return parse_policy(text, "p.yaml", environ or {})


def error_of(text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(PolicyError) as e:
        parse(text, environ)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_default_policy_routes_realtime_and_strips_extensions():
    policy = load_policy(DEFAULT_POLICY)
    assert policy.provider == "openai"
    assert policy.auth is None
    for path in (
        "/v1/realtime?model=gpt-realtime",
        "/openai/realtime?api-version=2025-04-01-preview&deployment=x",
        "/openai/v1/realtime",
    ):
        route = policy.match(path)
        assert route.type is RouteType.REALTIME
        assert route.request.remove == ("sec-websocket-extensions",)
    assert policy.match("/v1/chat/completions").type is RouteType.COMPLETIONS
    assert policy.match("/v1/responses").type is RouteType.RESPONSES
    assert policy.match("/v1/embeddings").type is RouteType.EMBEDDINGS
    assert policy.match("/v1/models").type is RouteType.PASSTHROUGH


def test_azure_example_uses_api_key_header(monkeypatch):
    policy = load_policy(POLICIES / "azure-openai.yaml", {"AZURE_OPENAI_API_KEY": "azure-secret"})
    assert policy.auth is not None
    assert policy.auth.header == "api-key"
    assert policy.auth.header_value == "azure-secret"
    assert "azure-secret" not in repr(policy)


def test_longest_suffix_wins_and_catch_all_is_last():
    policy = parse('routes:\n  "*": Passthrough\n  /completions: Embeddings\n  /chat/completions: Completions\n')
    assert [r.suffix for r in policy.routes] == ["/chat/completions", "/completions", "*"]
    assert policy.match("/v1/chat/completions").type is RouteType.COMPLETIONS
    assert policy.match("/v1/completions").type is RouteType.EMBEDDINGS
    assert policy.match("/v1/other").type is RouteType.PASSTHROUGH


def test_query_is_not_part_of_the_match_and_no_match_means_completions():
    policy = parse("routes:\n  /realtime: Realtime\n")
    assert policy.match("/v1/x?next=/realtime").type is RouteType.COMPLETIONS
    assert policy.match("/v1/realtime?model=m").type is RouteType.REALTIME


def test_long_form_header_policy():
    policy = parse(
        "routes:\n  /realtime:\n    type: Realtime\n    request:\n      remove: [Sec-WebSocket-Extensions]\n"
        "      set: {X-Team: voice}\n      add: {x-tag: a}\n"
    )
    assert policy.routes[0].request == HeaderPolicy(
        remove=("sec-websocket-extensions",), set=(("x-team", "voice"),), add=(("x-tag", "a"),)
    )


def test_model_override_on_a_route_or_the_whole_policy():
    policy = parse(
        "model: gpt-4o-mini\nroutes:\n  /realtime:\n    type: Realtime\n    model: gpt-realtime-mini\n  '*': Passthrough\n"
    )
    assert policy.model_for(policy.match("/v1/realtime")) == "gpt-realtime-mini"
    assert policy.model_for(policy.match("/v1/chat/completions")) == "gpt-4o-mini"
    assert parse("routes:\n  /x: Realtime\n").model_for(NO_MATCH) is None


def test_auth_reads_the_key_from_the_environment():
    policy = parse("auth:\n  env: KEY\nroutes:\n  '*': Passthrough\n", {"KEY": "sk-live"})
    assert policy.auth is not None and policy.auth.header_value == "Bearer sk-live"
    assert "sk-live" not in repr(policy)


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [
        (
            "routes:\n  /realtime: Realtim\n",
            {},
            "p.yaml:2: routes./realtime: expected one of Completions, Responses, Embeddings, Realtime, Passthrough, TextCompletions, Transcriptions, Translations, Speech, Images, RealtimeCalls, got 'Realtim'",
        ),
        (
            "routes:\n  /realtime:\n    type: 5\n",
            {},
            "p.yaml:3: routes./realtime.type: expected one of Completions, Responses, Embeddings, Realtime, Passthrough, TextCompletions, Transcriptions, Translations, Speech, Images, RealtimeCalls, got int 5",
        ),
        (
            "routes:\n  /x: Realtime\nprovder: x\n",
            {},
            "p.yaml:3: provder: unknown key; expected one of provider, auth, model, prices, budgets, limits, client_keys, routes, guardrails, redact",
        ),
        ("provider: openai\n", {}, "p.yaml:1: routes: missing; expected a mapping of path suffix to route type"),
        ("routes: [a]\n", {}, "p.yaml:1: routes: expected a mapping, got a list"),
        (
            "routes:\n  /x:\n    type: Realtime\n    request:\n      remove: sec-websocket-extensions\n",
            {},
            "p.yaml:5: routes./x.request.remove: expected a list of header names, got 'sec-websocket-extensions'",
        ),
        (
            "routes:\n  /x:\n    type: Realtime\n    request:\n      set: {x-a: 1}\n",
            {},
            "p.yaml:5: routes./x.request.set.x-a: expected a non-empty string, got int 1",
        ),
        (
            "routes:\n  /x:\n    type: Realtime\n    reqest: {}\n",
            {},
            "p.yaml:4: routes./x.reqest: unknown key; expected one of type, request, model, protocol, provider, guardrails",
        ),
        (
            "auth:\n  env: NOPE\nroutes:\n  /x: Realtime\n",
            {},
            "p.yaml:2: auth.env: environment variable NOPE is not set or empty; expected the upstream API key",
        ),
        (
            "auth:\n  env: K\n  header: x-key\nroutes:\n  /x: Realtime\n",
            {"K": "v"},
            "p.yaml:3: auth.header: expected one of authorization, api-key, x-goog-api-key, got 'x-key'",
        ),
        ("routes:\n  /x: Realtime\n  /x: Completions\n", {}, "p.yaml:3: routes./x: duplicate key"),
        ("routes:\n  /x: [Realtime\n", {}, "p.yaml:3: invalid YAML: expected ',' or ']', but got '<stream end>'"),
        ("provider: 3\nroutes:\n  /x: Realtime\n", {}, "p.yaml:1: provider: expected a non-empty string, got int 3"),
        ("", {}, "p.yaml: expected a mapping with at least 'routes', got an empty file"),
        ("routes: {}\n", {}, "p.yaml:1: routes: expected at least one route"),
        (
            "budgets:\n  session: {tokens: -5}\nroutes:\n  /x: Realtime\n",
            {},
            "p.yaml:2: budgets.session.tokens: expected a positive number, got int -5",
        ),
        (
            "budgets:\n  session: {tokens: 1.5}\nroutes:\n  /x: Realtime\n",
            {},
            "p.yaml:2: budgets.session.tokens: expected a whole number, got 1.5",
        ),
        (
            "budgets:\n  client_key: {usd: x}\nroutes:\n  /x: Realtime\n",
            {},
            "p.yaml:2: budgets.client_key.usd: expected a positive number, got 'x'",
        ),
        (
            "budgets:\n  session: {}\nroutes:\n  /x: Realtime\n",
            {},
            "p.yaml:2: budgets.session: expected tokens and/or usd",
        ),
        (
            "limits:\n  store: postgres://db/1\nroutes:\n  /x: Realtime\n",
            {},
            "p.yaml:2: limits.store: expected memory (this process's own) or a Redis URL (redis://host:port/db, "
            "rediss://, unix://), got 'postgres://db/1'",
        ),
        (
            "limits:\n  store: redis://r:6379/0\n  on_store_error: fail\nroutes:\n  /x: Realtime\n",
            {},
            "p.yaml:3: limits.on_store_error: expected open or closed, got 'fail'",
        ),
        (
            "limits:\n  store_timeout_ms: 0\nroutes:\n  /x: Realtime\n",
            {},
            "p.yaml:2: limits.store_timeout_ms: expected a positive number, got int 0",
        ),
    ],
)
def test_invalid_policies_name_file_line_key_and_expectation(text, environ, expected):
    assert error_of(text, environ) == expected


def test_unreadable_file_is_a_policy_error(tmp_path):
    with pytest.raises(PolicyError, match=r"missing\.yaml: cannot read policy file"):
        load_policy(tmp_path / "missing.yaml")


def test_a_policy_over_the_size_limit_is_refused_by_its_size_unread(tmp_path):
    """A sparse 1 GiB of NUL bytes: read, it would be invalid YAML (and take minutes); its size refuses it."""
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as file:
        file.truncate(2**30)
    started = time.monotonic()
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    assert time.monotonic() - started < 1
    assert str(e.value) == (
        f"{path}: the policy file is 1,073,741,824 bytes, over the limit of 4,194,304; "
        "raise gateway_policy_max_bytes to read it"
    )
    small = write_padded(tmp_path / "small.yaml", "routes:\n  /x: Realtime\n", 1000)
    assert load_policy(small, max_bytes=1000).routes[0].suffix == "/x"
    with pytest.raises(PolicyError, match=r"small\.yaml: the policy file is 1,000 bytes, over the limit of 999;"):
        load_policy(small, max_bytes=999)


def test_the_price_catalog_a_policy_names_has_the_same_limit(tmp_path):
    prices = write_padded(tmp_path / "prices.yaml", "taken: 2025-10-15\nsource: s\nmodels:\n  gpt-x: {input: 1}\n", 500)
    assert catalog_for("openai", prices, max_bytes=500).price("gpt-x") is not None
    with pytest.raises(PolicyError, match=r"prices\.yaml: the price catalog is 500 bytes, over the limit of 499;"):
        catalog_for("openai", prices, max_bytes=499)


def test_a_large_policy_within_the_limit_loads_fast(tmp_path):
    """3 MiB of comments: about 0.03 s with libyaml, 2.5 s with pyyaml's pure-Python parser."""
    path = write_padded(tmp_path / "large.yaml", "routes:\n  /x: Realtime\n", 3 * 2**20)
    started = time.monotonic()
    policy = load_policy(path)
    elapsed = time.monotonic() - started
    print(f"3 MiB policy loaded in {elapsed:.3f} s")
    assert policy.routes[0].suffix == "/x"
    assert elapsed < 1


def test_a_large_invalid_policy_is_refused_fast(tmp_path):
    """Its error is libyaml's (the line, not what was found): pyyaml's own message would cost seconds."""
    path = write_padded(tmp_path / "large.yaml", "routes:\n  /x: [Realtime\n", 4 * 2**20)
    started = time.monotonic()
    with pytest.raises(PolicyError, match=r"large\.yaml:\d+: invalid YAML: did not find expected ',' or '\]'$"):
        load_policy(path)
    assert time.monotonic() - started < 1


def test_nested_aliases_are_never_expanded():
    """Ten levels of nine aliases would expand to 3.5 billion strings; the node tree shares them."""
    levels = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    text = f"routes:\n  /x:\n    type: Realtime\n    request:\n      remove: [{', '.join(levels)}]\n"
    started = time.monotonic()
    assert error_of(text) == "p.yaml:5: routes./x.request.remove[0]: expected a non-empty string, got a list"
    assert time.monotonic() - started < 1
