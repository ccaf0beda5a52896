"""Cost from the price catalog and budgets enforced inside live sessions, end to end."""

from __future__ import annotations

import asyncio
import importlib.metadata

import pytest
import websockets
from openai import AsyncOpenAI

from ai_gateway.accounting.pricing import DATABASE, DATABASE_RELEASES, ModelPrices, catalog_for
from ai_gateway_tools.harness import GatewayProcess, scrape, select
from ai_gateway_tools.simulators.realtime import SimulatorThread

from ..clients import sdk_session, websocket_base

MODALITY_RATES = {
    "text": ("input", "cached_input"),
    "audio": ("audio_input", "cached_audio_input"),
    "image": ("image_input", "cached_image_input"),
}


def database_prices(model: str) -> ModelPrices:
    """The rates the default policy prices a model at: the database's, for provider openai."""
    prices = catalog_for("openai", None).price(model)
    assert prices is not None
    return prices


def hand_cost(usage: dict, prices: ModelPrices) -> float:
    """The catalog's rates applied by hand to a usage object as the upstream sent it."""
    details = usage["input_token_details"]
    cached = details["cached_tokens_details"]
    total = 0.0
    for modality, (fresh_rate, cached_rate) in MODALITY_RATES.items():
        fresh = details[f"{modality}_tokens"] - cached[f"{modality}_tokens"]
        total += fresh * getattr(prices, fresh_rate) + cached[f"{modality}_tokens"] * getattr(prices, cached_rate)
    output = usage["output_token_details"]
    total += output["text_tokens"] * prices.output + output["audio_tokens"] * prices.audio_output
    return total / 1_000_000


def test_cost_equals_catalog_rates_applied_to_what_the_upstream_sent(gateway, simulator):
    asyncio.run(sdk_session(gateway.url, "gpt-realtime", metadata=[{}] * 4))
    prices = database_prices("gpt-realtime")
    sent = simulator.usage_for("gpt-realtime")
    assert sent and any(e.usage["input_token_details"]["cached_tokens_details"]["audio_tokens"] for e in sent)
    samples = select(scrape(gateway.metrics_url), gen_ai_request_model="gpt-realtime")
    (cost,) = [v for (name, _), v in samples.items() if name == "agentgateway_gen_ai_client_cost_usd_total"]
    assert cost == pytest.approx(sum(hand_cost(e.usage, prices) for e in sent), rel=1e-12)
    lookups = {
        dict(labels)["status"]: v
        for (name, labels), v in samples.items()
        if name == "agentgateway_gateway_price_lookups_total"
    }
    assert lookups == {"priced": len(sent)}


def test_unpriced_models_are_counted_not_priced(gateway, simulator, model):
    asyncio.run(sdk_session(gateway.url, model, metadata=[{}]))
    samples = select(scrape(gateway.metrics_url), gen_ai_request_model=model)
    assert not [v for (name, _), v in samples.items() if name.endswith("_cost_usd_total")]
    assert [
        v
        for (name, labels), v in samples.items()
        if name.endswith("_price_lookups_total") and ("status", "unpriced") in labels
    ] == [1]


def catalog_info(samples) -> dict[str, tuple[str, str, float]]:
    """source -> (version, data_date, value) of the price catalog info metric."""
    return {
        dict(labels)["source"]: (dict(labels)["version"], dict(labels)["data_date"], v)
        for (name, labels), v in samples.items()
        if name == "agentgateway_gateway_price_catalog_info"
    }


def test_price_catalog_info_names_the_database_version_and_date(gateway):
    version = importlib.metadata.version("genai-prices")
    assert catalog_info(scrape(gateway.metrics_url)) == {
        DATABASE: (version, DATABASE_RELEASES[version], 1.0),
        "supplement-prices.yaml": ("", "2026-12-07", 1.0),
    }


def test_override_file_wins_over_the_database_end_to_end(tmp_path):
    override = tmp_path / "negotiated.yaml"
    override.write_text(
        "taken: 2026-12-01\nsource: contract\nmodels:\n"
        "  gpt-realtime: {input: 1, cached_input: 0.5, output: 2, audio_input: 3, cached_audio_input: 1.5, audio_output: 6, image_input: 4, cached_image_input: 2}\n"
    )
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"prices: {override}\nroutes:\n  /realtime: Realtime\n")
    with SimulatorThread(seed=5) as simulator:
        with GatewayProcess(simulator.url, options={"gateway_policy": str(policy)}) as gateway:
            asyncio.run(sdk_session(gateway.url, "gpt-realtime", metadata=[{}] * 2))
            asyncio.run(sdk_session(gateway.url, "gpt-realtime-mini", metadata=[{}]))
            samples = scrape(gateway.metrics_url)
    overridden = catalog_for("openai", override).price("gpt-realtime")
    assert overridden is not None and overridden != database_prices("gpt-realtime")
    for model, prices in (("gpt-realtime", overridden), ("gpt-realtime-mini", database_prices("gpt-realtime-mini"))):
        (cost,) = [
            v
            for (name, _), v in select(samples, gen_ai_request_model=model).items()
            if name == "agentgateway_gen_ai_client_cost_usd_total"
        ]
        assert cost == pytest.approx(sum(hand_cost(e.usage, prices) for e in simulator.usage_for(model)), rel=1e-12)
    version = importlib.metadata.version("genai-prices")
    assert catalog_info(samples) == {
        "negotiated.yaml": ("", "2026-12-01", 1.0),
        DATABASE: (version, DATABASE_RELEASES[version], 1.0),
        "supplement-prices.yaml": ("", "2026-12-07", 1.0),
    }


def budget_policy(tmp_path, budgets: str):
    policy = tmp_path / "budget.yaml"
    policy.write_text(f"budgets:\n{budgets}routes:\n  /realtime: Realtime\n  /embeddings: Embeddings\n")
    return policy


def first_response_tokens(seed: int) -> int:
    """What the simulator's first response with this seed bills, learnt by asking it directly."""
    with SimulatorThread(seed=seed) as probe:
        asyncio.run(sdk_session(probe.url, "gpt-realtime", metadata=[{}]))
        return probe.ledger[0].usage["total_tokens"]


def test_session_budget_refuses_the_third_response_with_an_error_event(tmp_path):
    # Room for the first response and a little more: the second is allowed, the third refused.
    limit = first_response_tokens(seed=11) + 1
    with SimulatorThread(seed=11) as simulator:
        policy = budget_policy(tmp_path, f"  session: {{tokens: {limit}}}\n")
        with GatewayProcess(simulator.url, options={"gateway_policy": str(policy)}) as gateway:
            client = AsyncOpenAI(api_key="sk-client", websocket_base_url=websocket_base(gateway.url) + "/v1")

            async def session() -> list:
                events = []
                async with client.realtime.connect(model="gpt-realtime") as connection:
                    for _ in range(3):
                        await connection.response.create()
                        async for event in connection:
                            if event.type in ("response.done", "error"):
                                events.append(event)
                                break
                return events

            done1, done2, refused = asyncio.run(session())
            samples = scrape(gateway.metrics_url)
    first, second = (e.usage for e in simulator.ledger)
    assert first["total_tokens"] < limit <= first["total_tokens"] + second["total_tokens"]
    assert [done1.type, done2.type] == ["response.done", "response.done"]
    assert refused.type == "error"
    assert refused.error.type == "invalid_request_error" and refused.error.code == "budget_exceeded"
    assert len(simulator.ledger) == 2, "the refused response.create must never reach the upstream"
    assert (
        samples[
            (
                "agentgateway_gateway_budget_enforcements_total",
                frozenset({("scope", "session"), ("action", "refused_response"), ("reason", "budget_exceeded")}),
            )
        ]
        == 1
    )
    prices = database_prices("gpt-realtime")
    costs = [v for (name, _), v in samples.items() if name == "agentgateway_gen_ai_client_cost_usd_total"]
    assert costs == [pytest.approx(hand_cost(first, prices) + hand_cost(second, prices), rel=1e-12)]


def test_client_key_budget_spans_sessions_and_rejects_http_with_429(tmp_path):
    with SimulatorThread(seed=3) as simulator:
        policy = budget_policy(tmp_path, "  client_key: {usd: 0.000001}\n  window: 3600\n")
        with GatewayProcess(simulator.url, options={"gateway_policy": str(policy)}) as gateway:
            asyncio.run(sdk_session(gateway.url, "gpt-realtime", metadata=[{}], api_key="sk-team-a"))
            url = f"{websocket_base(gateway.url)}/v1/realtime?model=gpt-realtime"

            async def refused_handshake() -> int:
                with pytest.raises(websockets.InvalidStatus) as e:
                    async with websockets.connect(url, additional_headers={"authorization": "Bearer sk-team-a"}):
                        pass
                return e.value.response.status_code

            assert asyncio.run(refused_handshake()) == 429
            # another key is not affected
            asyncio.run(sdk_session(gateway.url, "gpt-realtime", metadata=[{}], api_key="sk-team-b"))
            samples = scrape(gateway.metrics_url)
    assert len(simulator.ledger) == 2
    remaining = {
        dict(labels)["unit"]: v
        for (name, labels), v in samples.items()
        if name == "agentgateway_gateway_budget_remaining"
    }
    assert remaining == {"usd": 0.0}
    keys = {
        dict(labels)["client_key"]
        for (name, labels), v in samples.items()
        if name == "agentgateway_gateway_budget_remaining"
    }
    assert len(keys) == 2 and not any("sk-team" in k for k in keys)
    assert (
        samples[
            (
                "agentgateway_gateway_budget_enforcements_total",
                frozenset({("scope", "client_key"), ("action", "rejected_session"), ("reason", "budget_exceeded")}),
            )
        ]
        == 1
    )


def test_upstream_rate_limits_are_exported(gateway, simulator, model):
    asyncio.run(sdk_session(gateway.url, model, metadata=[{}]))
    samples = scrape(gateway.metrics_url)
    limits = {
        dict(labels)["name"]: v
        for (name, labels), v in samples.items()
        if name == "agentgateway_gateway_upstream_rate_limit_limit"
    }
    assert limits == {"requests": 5000, "tokens": 40000}
