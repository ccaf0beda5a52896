"""The habits of real clients and servers, end to end: key orders other than OpenAI's, responses the
upstream refuses, a response.done sent twice, a response.done without usage, and budget checks
that no spelling of `response.create` slips past."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest
import websockets

from ai_gateway_tools.harness import GatewayProcess, expected_samples, scrape, select, usage_only
from ai_gateway_tools.simulators.realtime import Simulator, SimulatorThread

from ..clients import sdk_session, websocket_base

ERRORS = "agentgateway_gateway_upstream_errors_total"
PARSE_ERRORS = "agentgateway_gateway_parse_errors_total"


@pytest.fixture(scope="module", params=["sorted", "event_id_first"])
def odd_upstream(request: pytest.FixtureRequest) -> Iterator[Simulator]:
    """Servers that serialise openai-python models with sorted keys (type last), and DashScope's
    event_id-first frames."""
    with SimulatorThread(seed=11, key_order=request.param) as simulator:
        yield simulator


@pytest.fixture(scope="module")
def odd_gateway(odd_upstream: Simulator) -> Iterator[GatewayProcess]:
    with GatewayProcess(odd_upstream.url) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def exclusive_upstream() -> Iterator[Simulator]:
    """OpenAI's own behaviour: one response at a time, a second response.create is an error event."""
    with SimulatorThread(seed=12, exclusive_responses=True) as simulator:
        yield simulator


def metered(gateway: GatewayProcess, model: str) -> dict:
    return select(scrape(gateway.metrics_url), gen_ai_request_model=model)


def counter(gateway: GatewayProcess, name: str, **labels: str) -> float:
    return sum(select({k: v for k, v in scrape(gateway.metrics_url).items() if k[0] == name}, **labels).values())


def histogram_count(samples: dict, metric: str) -> float:
    return sum(v for (name, _), v in samples.items() if name == f"agentgateway_gen_ai_server_{metric}_count")


def test_servers_that_do_not_put_the_type_first_are_metered_exactly(odd_gateway, odd_upstream, model):
    errors_before = counter(odd_gateway, ERRORS, error_type="error_event")
    asyncio.run(sdk_session(odd_gateway.url, model))
    sent = odd_upstream.usage_for(model)
    assert sum(e.kind == "response" for e in sent) == 3
    samples = metered(odd_gateway, model)
    assert usage_only(samples) == expected_samples(sent)
    assert histogram_count(samples, "time_to_first_token") == 3  # the deltas' type was read, unparsed

    async def refused() -> str:
        async with websockets.connect(f"{websocket_base(odd_gateway.url)}/v1/realtime?model={model}") as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "response.create", "response": {"metadata": {"sim_status": "nope"}}}))
            return json.loads(await ws.recv())["type"]

    assert asyncio.run(refused()) == "error"
    assert counter(odd_gateway, ERRORS, error_type="error_event") == errors_before + 1


async def refused_then_next(url: str) -> tuple[list[float], dict]:
    """c1 is answered; c2, sent while c1 runs, is refused by the upstream; c3 is sent after c1 ends.
    Returns what the client saw: for c1 and c3, the time from sending to the first delta."""
    seen: list[float] = []
    error: dict | None = None
    # c1 streams long enough that c2 surely arrives while it is in progress: its deltas are on the
    # clock (a second in all), as 200 unpaced ones could all be out before c2 on a loaded machine
    long = {"metadata": {"sim_deltas": "20", "sim_delta_ms": "50"}}
    async with websockets.connect(url) as ws:
        await ws.recv()  # session.created
        for event_id in ("c1", "c3"):
            sent = time.monotonic()
            response = long if event_id == "c1" else {}
            await ws.send(json.dumps({"event_id": event_id, "type": "response.create", "response": response}))
            if event_id == "c1":
                await ws.send(json.dumps({"event_id": "c2", "type": "response.create"}))
            first = None
            while True:
                event = json.loads(await ws.recv())
                if event["type"] == "error":
                    error = event["error"]
                if first is None and event["type"].endswith(".delta"):
                    first = time.monotonic()
                if event["type"] == "response.done":
                    break
            assert first is not None
            seen.append(first - sent)
        await ws.close(1000)
    assert error is not None, "the upstream refused nothing"
    return seen, error


def test_a_response_create_the_upstream_refuses_leaves_no_pending_state(exclusive_upstream, model):
    with GatewayProcess(exclusive_upstream.url) as gateway:
        url = f"{websocket_base(gateway.url)}/v1/realtime?model={model}"
        seen, error = asyncio.run(refused_then_next(url))
        assert error["code"] == "conversation_already_has_active_response" and error["event_id"] == "c2"
        samples = metered(gateway, model)
        ttft = [v for (name, _), v in samples.items() if name == "agentgateway_gen_ai_server_time_to_first_token_sum"]
        assert histogram_count(samples, "time_to_first_token") == 2
        # The gateway sees each create after the client sent it and each delta before the client
        # gets it: its figures are within the client's, unless a refused create were taken for c3's.
        assert 0 < sum(ttft) <= sum(seen), (ttft, seen)
        assert counter(gateway, ERRORS, error_type="client_disconnected") == 0


async def responses(url: str, metadata: list[dict], done_frames: list[int]) -> None:
    """One response.create per metadata, each read until its count of response.done frames."""
    async with websockets.connect(url) as ws:
        await ws.recv()
        for meta, count in zip(metadata, done_frames, strict=True):
            await ws.send(json.dumps({"type": "response.create", "response": {"metadata": meta}}))
            while count:
                count -= json.loads(await ws.recv())["type"] == "response.done"


def test_a_response_done_sent_twice_is_billed_once(simulator, model, tmp_path):
    ledger = tmp_path / "usage.jsonl"
    with GatewayProcess(simulator.url, options={"gateway_usage_log": str(ledger)}) as gateway:
        url = f"{websocket_base(gateway.url)}/v1/realtime?model={model}"
        asyncio.run(responses(url, [{"sim_repeat_done": "1"}, {}], done_frames=[2, 1]))
        sent = simulator.usage_for(model)
        assert usage_only(metered(gateway, model)) == expected_samples(sent)
        assert counter(gateway, PARSE_ERRORS, reason="duplicate_usage") == 1
    lines = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert len(lines) == 2 and len({line["response_id"] for line in lines}) == 2


def test_a_response_done_without_usage_counts_as_a_response(gateway, simulator, model):
    before = counter(gateway, PARSE_ERRORS, reason="missing_usage")
    asyncio.run(sdk_session(gateway.url, model, metadata=[{"sim_usage": "null", "sim_status": "cancelled"}, {}]))
    sent = simulator.usage_for(model)
    assert [e.kind for e in sent] == ["unbilled_response", "response"]
    samples = metered(gateway, model)
    assert usage_only(samples) == expected_samples(sent)
    responses = {
        dict(labels)["status"]: v for (name, labels), v in samples.items() if name.endswith("_responses_total")
    }
    assert responses == {"cancelled": 1, "completed": 1}
    assert counter(gateway, PARSE_ERRORS, reason="missing_usage") == before + 1


# Each spelling of one request for a response, as real clients and attackers write it.
CREATES = [
    '{"event_id": "%s", "type": "response.create"}',  # pipecat: event_id first
    '{"type": "response.create", "event_id": "%s"}',
    '{"event_id": "%s", "response": {"instructions": "hi"}, "type": "response.create"}',  # sorted keys
    '{"event_id": "%s", "type": "response\\u002ecreate"}',  # escaped
    '{"event_id": "%s", "type": "input_audio_buffer.append", "audio": "", "type": "response.create"}',
    '{"type": "response.create", "event_id": "%s", "type": "input_audio_buffer.append", "audio": ""}',
]


def test_no_spelling_of_response_create_slips_past_a_spent_session_budget(tmp_path, model):
    policy = tmp_path / "budget.yaml"
    policy.write_text("budgets:\n  session: {tokens: 1}\nroutes:\n  /realtime: Realtime\n")
    with (
        SimulatorThread(seed=13) as upstream,
        GatewayProcess(upstream.url, options={"gateway_policy": str(policy)}) as gw,
    ):

        async def session() -> list[dict]:
            refusals = []
            async with websockets.connect(f"{websocket_base(gw.url)}/v1/realtime?model={model}") as ws:
                await ws.recv()
                await ws.send(CREATES[0] % "first")
                while json.loads(await ws.recv())["type"] != "response.done":
                    pass  # the first response spends the budget
                for i, spelling in enumerate(CREATES):
                    await ws.send(spelling % f"c{i}")
                    refusals.append(json.loads(await ws.recv()))
            return refusals

        refusals = asyncio.run(session())
        assert [r["type"] for r in refusals] == ["error"] * len(CREATES)
        assert [r["error"]["code"] for r in refusals] == ["budget_exceeded"] * len(CREATES)
        assert [r["error"]["event_id"] for r in refusals] == [f"c{i}" for i in range(len(CREATES))]
        assert len(upstream.ledger) == 1  # nothing after the first response reached the upstream
        assert counter(gw, "agentgateway_gateway_budget_enforcements_total", action="refused_response") == len(CREATES)


async def fragments(message: str, release: asyncio.Event):
    yield message[:1000]
    await release.wait()
    yield message[1000:]


async def half_sent_delta_upstream(ws) -> None:
    """Starts a response, sends the first fragment of an audio delta, and finishes that delta only
    when the client says so: meanwhile the gateway injects its refusal of the client's second
    response.create, which mitmproxy would glue onto the half-received delta."""
    await ws.send(json.dumps({"type": "session.created", "session": {"model": "gpt-realtime-2025-08-28"}}))
    async for message in ws:
        event = json.loads(message)
        if event["type"] == "response.create":
            await ws.send(json.dumps({"type": "response.created", "response": {"id": "r1"}}))
            delta = json.dumps({"type": "response.output_audio.delta", "response_id": "r1", "delta": "A" * 4000})
            release = asyncio.Event()

            sending = asyncio.ensure_future(ws.send(fragments(delta, release)))
            while json.loads(await ws.recv())["type"] != "test.continue":
                pass
            release.set()
            await sending
            usage = {"input_tokens": 1, "output_tokens": 1}
            await ws.send(
                json.dumps({"type": "response.done", "response": {"id": "r1", "status": "completed", "usage": usage}})
            )


def test_an_injected_refusal_is_never_glued_onto_a_half_received_message(tmp_path):
    policy = tmp_path / "budget.yaml"
    policy.write_text("budgets:\n  session: {tokens: 1}\n  reserve: {tokens: 1}\nroutes:\n  /realtime: Realtime\n")

    async def run() -> list[str]:
        async with websockets.serve(half_sent_delta_upstream, "127.0.0.1", 0) as server:
            upstream = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            with GatewayProcess(upstream, options={"gateway_policy": str(policy)}) as gateway:
                received = []
                async with websockets.connect(f"{websocket_base(gateway.url)}/v1/realtime?model=gpt-realtime") as ws:
                    await ws.recv()
                    await ws.send(json.dumps({"type": "response.create"}))
                    received.append(await ws.recv())  # response.created; the delta is half sent now
                    await ws.send(json.dumps({"event_id": "c2", "type": "response.create"}))  # over budget
                    received.append(await ws.recv())  # the refusal
                    await ws.send(json.dumps({"type": "test.continue"}))
                    received += [await ws.recv(), await ws.recv()]  # the whole delta, response.done
                return received

    received = asyncio.run(run())
    types = [json.loads(frame)["type"] for frame in received]  # every frame is one whole JSON event
    assert types == ["response.created", "error", "response.output_audio.delta", "response.done"]
    assert json.loads(received[1])["error"]["event_id"] == "c2"
    assert json.loads(received[2])["delta"] == "A" * 4000
