"""End to end: GPT-Live sessions from the openai SDK (`client.live.connect()`) through the real
gateway with the default policy (both launchers) to the simulated GPT-Live upstream: seconds, cost,
delegated tokens and ledger lines compared to exactly what the upstream reported."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from openai import AsyncOpenAI

from ai_gateway.tools.harness import GatewayProcess, expected_samples, scrape, select, usage_only
from ai_gateway.tools.simulators.live import LiveSimulator
from ai_gateway.tools.simulators.realtime import SimulatorThread

from .clients import wait_until, websocket_base
from .conftest import LAUNCHERS

PER_MINUTE = {"gpt-live-1": (0.05, 0.05), "gpt-live-1.1": (0.05, 0.02)}  # active, paused (USD per minute)
COST = "agentgateway_gen_ai_client_cost_usd_total"

_names = itertools.count()


@pytest.fixture(scope="module")
def live_simulators() -> Iterator[dict[str, LiveSimulator]]:
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(SimulatorThread(server=LiveSimulator(seed=23))) for name in LAUNCHERS}


@pytest.fixture(scope="module", params=LAUNCHERS)
def live_gateway(request, live_simulators, tmp_path_factory) -> Iterator[GatewayProcess]:
    ledger = tmp_path_factory.mktemp(f"ledger-{request.param}") / "usage.jsonl"
    options = {"gateway_usage_log": str(ledger)}
    with GatewayProcess(live_simulators[request.param].url, options=options, launcher=request.param) as gw:
        gw.ledger = ledger  # type: ignore[attr-defined]
        yield gw


@pytest.fixture
def live_simulator(live_gateway, live_simulators) -> LiveSimulator:
    return live_simulators[live_gateway.launcher]


async def live_session(
    gateway_url: str, model: str, steps: list[str], delegate: str = "gpt-5-mini", api_key: str = "sk-client"
) -> list[dict[str, Any]]:
    """A session with the SDK's live client: session.start, then each step (`tick`: an audio append,
    `mute`/`unmute`, `delegate`: response.create, `say:<text>`: instructions, `close`: session.close);
    returns the server events received, as dicts, until the session ends."""
    client = AsyncOpenAI(api_key=api_key, websocket_base_url=websocket_base(gateway_url) + "/v1")
    received: list[dict[str, Any]] = []

    async def until(*kinds: str) -> None:
        while True:
            event = json.loads(await asyncio.wait_for(connection.recv_bytes(), 20))
            received.append(event)
            if event["type"] in kinds:
                return

    async with client.live.connect() as connection:
        session = {"model": model, "delegation": {"type": "responses", "responses": {"model": delegate}}}
        await connection.send({"type": "session.start", "session": session})
        await until("session.started")
        for step in steps:
            if step == "tick":
                await connection.send({"type": "session.input_audio.append", "audio": "AAAA"})
                await until("session.output_audio.delta")
            elif step in ("mute", "unmute"):
                await connection.send({"type": f"session.input_audio.{step}"})
                await until("session.paused", "session.resumed")
            elif step == "delegate":
                await connection.send({"type": "response.create"})
                await until("response.event")
                while received[-1]["event"]["type"] != "response.completed":
                    await until("response.event")
            elif step.startswith("say:"):
                event = {"type": "session.instructions.append", "content": step[4:], "delegation_id": None}
                await connection.send(event)
                if "sim_expire" in step:
                    await until("session.closed")
                    break
            elif step == "close":
                await connection.send({"type": "session.close"})
                await until("session.closed")
    return received


def ledger_lines(gateway: GatewayProcess) -> list[dict[str, Any]]:
    path: Path = gateway.ledger  # type: ignore[attr-defined]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def session_line(gateway: GatewayProcess, model: str) -> dict[str, Any]:
    """The session's ledger line, written when the gateway has seen the session end: polled."""

    def find() -> dict[str, Any] | None:
        return next((r for r in ledger_lines(gateway) if r["request_model"] == model and "session_seconds" in r), None)

    return wait_until(find)


def access_log_line(gateway: GatewayProcess, model: str) -> str:
    """The session's access-log line (text format, on the gateway's stdout) and a space, once written: polled."""

    def find() -> str | None:
        lines = gateway.log().splitlines()
        return next((line + " " for line in lines if " session " in line and f"request_model={model} " in line), None)

    return wait_until(find)


def metered(gateway: GatewayProcess, model: str) -> dict:
    return usage_only(select(scrape(gateway.metrics_url), gen_ai_request_model=model))


def test_seconds_and_delegated_tokens_are_metered_exactly(live_gateway, live_simulator):
    model, delegate = f"gpt-live-t{next(_names)}", f"gpt-5-t{next(_names)}"
    steps = ["tick"] * 7 + ["delegate", "tick", "tick", "delegate", "close"]
    received = asyncio.run(live_session(live_gateway.url, model, steps, delegate))
    reports = [e["usage"] for e in received if e["type"] == "session.usage.updated"]
    assert any(isinstance(r["seconds"], float) for r in reports)  # `6.0` on the wire
    (closed,) = [e for e in received if e["type"] == "session.closed"]
    assert closed["reason"] == "close_requested"
    sent = live_simulator.usage_for(model)
    assert [e.kind for e in sent].count("responses") == 2
    line = session_line(live_gateway, model)
    assert (line["status"], line["session_seconds"], line["paused_seconds"]) == ("close_requested", 9.0, 0.0)
    assert line["response_id"] == closed["session"]["id"]
    logged = access_log_line(live_gateway, model)
    assert " session_seconds=9 " in logged and " close_reason=close_requested " in logged
    expected = expected_samples([e for e in sent if e.kind == "live_session"])
    assert metered(live_gateway, model) == expected
    assert metered(live_gateway, delegate) == expected_samples([e for e in sent if e.kind == "responses"])
    delegated = [r for r in ledger_lines(live_gateway) if r["request_model"] == delegate]
    assert [(r["input_tokens"], r["output_tokens"]) for r in delegated] == [
        (e.usage["input_tokens"], e.usage["output_tokens"]) for e in sent if e.kind == "responses"
    ]


def costs(gateway: GatewayProcess, model: str) -> float:
    samples = select(scrape(gateway.metrics_url), gen_ai_request_model=model, gen_ai_operation_name="realtime")
    return sum(v for (name, _), v in samples.items() if name == COST)


@pytest.mark.parametrize("model", ["gpt-live-1", "gpt-live-1.1"])
def test_paused_time_is_priced_at_its_own_rate(live_gateway, live_simulator, model):
    before = costs(live_gateway, model)
    steps = ["tick"] * 3 + ["mute"] + ["tick"] * 6 + ["unmute"] + ["tick"] * 3 + ["close"]
    received = asyncio.run(live_session(live_gateway.url, model, steps))
    final = next(e["usage"] for e in received if e["type"] == "session.closed")
    assert (final["active_seconds"], final["paused_seconds"]) == (6, 6)
    active_rate, paused_rate = PER_MINUTE[model]
    expected = (6 * active_rate + 6 * paused_rate) / 60
    wait_until(lambda: costs(live_gateway, model) - before > expected - 1e-9)
    assert costs(live_gateway, model) - before == pytest.approx(expected)
    line = [r for r in ledger_lines(live_gateway) if r["request_model"] == model and "session_seconds" in r][-1]
    assert (line["active_seconds"], line["paused_seconds"]) == (6.0, 6.0)
    assert line["cost_usd"] == pytest.approx(expected)


def test_a_lower_report_is_not_billed_and_a_dropped_session_bills_its_last_report(live_gateway, live_simulator):
    model = f"gpt-live-t{next(_names)}"
    steps = ["tick"] * 4 + ["say:sim_decrease", "tick", "tick", "say:sim_drop"]
    with contextlib.suppress(Exception):  # the upstream drops the connection
        asyncio.run(live_session(live_gateway.url, model, steps))
    line = session_line(live_gateway, model)
    (entry,) = [e for e in live_simulator.usage_for(model) if e.kind == "live_session"]
    assert entry.status == line["status"] == "unclosed"
    assert line["session_seconds"] == entry.usage["seconds"] == 6
    assert " close_reason=unclosed " in access_log_line(live_gateway, model)
    assert metered(live_gateway, model) == expected_samples([entry])
    errors = select(scrape(live_gateway.metrics_url), reason="usage_decreased")
    assert sum(errors.values()) >= 1


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_session_whose_budget_the_seconds_spend_is_closed_within_one_report(live_simulators, tmp_path, launcher):
    """gpt-live-1 at $0.05/min: a $0.004 session budget lasts 4.8 s; the report at 6 s spends it."""
    simulator = live_simulators[launcher]
    policy = tmp_path / "budget.yaml"
    policy.write_text(
        "budgets:\n  session: {usd: 0.004}\nroutes:\n  /live/sessions: {type: Realtime, protocol: openai-live}\n"
    )
    ledger = tmp_path / "usage.jsonl"
    options = {"gateway_policy": str(policy), "gateway_usage_log": str(ledger)}
    with GatewayProcess(simulator.url, options=options, launcher=launcher) as gateway:
        gateway.ledger = ledger  # type: ignore[attr-defined]
        with pytest.raises(websockets.ConnectionClosed) as closed:
            asyncio.run(live_session(gateway.url, "gpt-live-1", ["tick"] * 12))
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        line = session_line(gateway, "gpt-live-1")
        assert (line["status"], line["session_seconds"]) == ("unclosed", 6.0)
        assert line["cost_usd"] == pytest.approx(6 * 0.05 / 60)
        samples = scrape(gateway.metrics_url)
        assert sum(select(samples, action="closed_session", reason="budget_exceeded").values()) == 1
    # The gateway ended the session upstream too: the simulator got session.close.
    (entry,) = [e for e in simulator.ledger if e.kind == "live_session" and e.session_id == line["response_id"]]
    assert entry.status == "close_requested"
