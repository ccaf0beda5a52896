"""End to end: GPT-Live sessions from the openai SDK (`client.live.connect()`) through the real
gateway with the default policy (both launchers) to the simulated GPT-Live upstream: seconds, cost,
delegated tokens and ledger lines compared to exactly what the upstream reported."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from openai import AsyncOpenAI
from websockets.sync.client import connect as sync_connect

from ai_gateway_tools.harness import GatewayProcess, expected_samples, scrape, select, usage_only
from ai_gateway_tools.simulators.live import LiveSimulator
from ai_gateway_tools.simulators.realtime import SimulatorThread

from ..clients import served_module, wait_until, websocket_base
from ..conftest import LAUNCHERS

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
    gateway_url: str,
    model: str,
    steps: list[str],
    delegate: str = "gpt-5-mini",
    api_key: str = "sk-client",
    sideband: str | None = None,
) -> list[dict[str, Any]]:
    """A session with the SDK's live client: session.start (or, with `sideband` a session id, the
    SDK's sideband client attaching to it), then each step (`tick`: an audio append, `mute`/`unmute`,
    `delegate`: response.create, `say:<text>`: instructions, `wait`: until the session ends,
    `close`: session.close); returns the server events received, as dicts, until the session ends."""
    client = AsyncOpenAI(api_key=api_key, websocket_base_url=websocket_base(gateway_url) + "/v1")
    received: list[dict[str, Any]] = []
    if sideband is not None:
        connect: Any = client.live.sideband.connect(session_id=sideband, graceful_close=True)
    else:
        connect = client.live.connect()

    async def until(*kinds: str) -> None:
        while True:
            event = json.loads(await asyncio.wait_for(connection.recv_bytes(), 20))
            received.append(event)
            if event["type"] in kinds:
                return

    async with connect as connection:
        if sideband is None:
            session = {"model": model, "delegation": {"type": "responses", "responses": {"model": delegate}}}
            await connection.send({"type": "session.start", "session": session})
            await until("session.started")
        else:
            await until("session.updated")
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
                if "sim_drop" in step:
                    await until("session.closed")  # never comes: the upstream drops the connection
            elif step == "wait":  # for the session to end, relaying what comes meanwhile
                await until("session.closed")
            elif step == "close":
                await connection.send({"type": "session.close"})
                await until("session.closed")
    return received


def ledger_lines(gateway: GatewayProcess) -> list[dict[str, Any]]:
    path: Path = gateway.ledger  # type: ignore[attr-defined]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def session_line(gateway: GatewayProcess, name: str) -> dict[str, Any]:
    """The ledger line of the session of this model or upstream session id, written when the gateway
    has seen the session end: polled."""

    def find() -> dict[str, Any] | None:
        lines = ledger_lines(gateway)
        return next(
            (r for r in lines if name in (r["request_model"], r["response_id"]) and "session_seconds" in r), None
        )

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
    closed = next(e for e in received if e["type"] == "session.closed")
    final = closed["usage"]
    assert (final["active_seconds"], final["paused_seconds"]) == (6, 6)
    active_rate, paused_rate = PER_MINUTE[model]
    expected = (6 * active_rate + 6 * paused_rate) / 60
    wait_until(lambda: costs(live_gateway, model) - before > expected - 1e-9)
    assert costs(live_gateway, model) - before == pytest.approx(expected)
    line = session_line(live_gateway, closed["session"]["id"])
    assert (line["active_seconds"], line["paused_seconds"]) == (6.0, 6.0)
    assert line["cost_usd"] == pytest.approx(expected)


def test_a_lower_report_is_not_billed_and_a_dropped_session_bills_its_last_report(live_gateway, live_simulator):
    model = f"gpt-live-t{next(_names)}"
    steps = ["tick"] * 4 + ["say:sim_decrease", "tick", "tick", "say:sim_drop"]
    with pytest.raises(websockets.ConnectionClosedError):  # the upstream dropped the connection
        asyncio.run(live_session(live_gateway.url, model, steps))
    line = session_line(live_gateway, model)
    (entry,) = live_simulator.usage_for(model, "live_session")
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


def test_a_sideband_is_metered_under_the_model_the_server_names(live_gateway, live_simulator):
    session_id = f"sess_side{next(_names)}"
    steps = ["tick"] * 2 + ["mute"] + ["tick"] * 4 + ["close"]
    asyncio.run(live_session(live_gateway.url, "", steps, sideband=session_id))
    assert live_simulator.handshakes[-1].path == f"/v1/live/sessions/{session_id}/attach"
    assert live_simulator.handshakes[-1].query == {"graceful_close": "true"}
    line = session_line(live_gateway, session_id)
    assert (line["request_model"], line["active_seconds"], line["paused_seconds"]) == ("gpt-live-1.1", 2.0, 4.0)
    assert line["cost_usd"] == pytest.approx((2 * 0.05 + 4 * 0.02) / 60)


def test_handshakes_are_admitted_like_other_sessions(live_simulators, tmp_path):
    """An unknown client key gets 401; a known one is held to its concurrent sessions."""
    known = "sk-team-live"
    policy = tmp_path / "keys.yaml"
    policy.write_text(
        f"client_keys:\n  require: true\n  keys:\n    - {{sha256: {hashlib.sha256(known.encode()).hexdigest()}, "
        "name: team-live}\nlimits:\n  client_key: {concurrent_sessions: 1}\nroutes:\n"
        "  /live/sessions: {type: Realtime, protocol: openai-live}\n"
    )
    simulator = live_simulators[LAUNCHERS[0]]
    with GatewayProcess(simulator.url, options={"gateway_policy": str(policy)}) as gateway:
        with pytest.raises(websockets.InvalidStatus) as refused:
            asyncio.run(live_session(gateway.url, "gpt-live-1", ["close"], api_key="sk-stranger"))
        assert refused.value.response.status_code == 401

        async def two_at_once() -> int:
            client = AsyncOpenAI(api_key=known, websocket_base_url=websocket_base(gateway.url) + "/v1")
            async with client.live.connect() as first:
                await first.send({"type": "session.start", "session": {"model": "gpt-live-1"}})
                await first.recv_bytes()
                with pytest.raises(websockets.InvalidStatus) as second:
                    await live_session(gateway.url, "gpt-live-1", ["close"], api_key=known)
            return second.value.response.status_code

        assert asyncio.run(two_at_once()) == 429

        def headroom() -> float:
            samples = select(scrape(gateway.metrics_url), client_key="team-live", limit="concurrent_sessions")
            return sum(samples.values())

        wait_until(lambda: headroom() == 1)  # the first session ended: its slot is free again
        asyncio.run(live_session(gateway.url, "gpt-live-1", ["tick", "close"], api_key=known))

        # WebRTC creation (POST /v1/live/sessions): checked and counted; its time is billed on a sideband.
        def create(key: str) -> int:
            body = json.dumps({"session": {"model": "gpt-live-1"}, "transport": {"type": "webrtc", "sdp": "v=0"}})
            request = urllib.request.Request(
                gateway.url + "/v1/live/sessions", body.encode(), {"authorization": f"Bearer {key}"}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status
            except urllib.error.HTTPError as e:
                return e.code

        assert create("sk-stranger") == 401
        assert create(known) != 401  # admitted: the simulated upstream speaks no HTTP, whatever it answers
        calls = select(scrape(gateway.metrics_url), kind="sessions")
        assert sum(v for (name, _), v in calls.items() if name == "agentgateway_gateway_realtime_calls_total") == 1


@pytest.mark.parametrize("relay", ["messages", "frames"])
def test_max_session_seconds_ends_a_gpt_live_session_upstream_and_on_both_legs(live_simulators, tmp_path, relay):
    simulator = live_simulators[LAUNCHERS[0]]
    policy = tmp_path / "limits.yaml"
    policy.write_text(
        "limits:\n  client_key: {max_session_seconds: 1}\nroutes:\n"
        "  /live/sessions: {type: Realtime, protocol: openai-live, request: {remove: [sec-websocket-extensions]}}\n"
    )  # no compression, as the default policy: a session with permessage-deflate stays on messages
    ledger = tmp_path / "usage.jsonl"
    options = {
        "gateway_policy": str(policy), "gateway_usage_log": str(ledger), "gateway_relay": relay,
        "termlog_verbosity": "debug",
    }  # fmt: skip
    with GatewayProcess(simulator.url, options=options) as gateway:
        gateway.ledger = ledger  # type: ignore[attr-defined]
        with pytest.raises(websockets.ConnectionClosed) as closed:
            asyncio.run(live_session(gateway.url, "gpt-live-1", ["tick"] * 3 + ["wait"]))
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        line = session_line(gateway, "gpt-live-1")
        assert (line["status"], line["session_seconds"]) == ("unclosed", 3.0)
        samples = scrape(gateway.metrics_url)
        assert sum(select(samples, action="closed_session", reason="session_too_long").values()) == 1
    (entry,) = [e for e in simulator.ledger if e.kind == "live_session" and e.session_id == line["response_id"]]
    assert entry.status == "close_requested"  # the upstream was told to end the session
    assert ("as frames" in gateway.log()) == (relay == "frames")


def test_the_simulator_runs_as_a_module_until_interrupted():
    with served_module("ai_gateway_tools.simulators.live") as url:
        with sync_connect(websocket_base(url) + "/v1/live/sessions", open_timeout=2) as ws:
            ws.send(json.dumps({"type": "session.start", "session": {"model": "gpt-live-1"}}))
            started = json.loads(ws.recv(timeout=2))
            assert (started["type"], started["session"]["model"]) == ("session.started", "gpt-live-1")
