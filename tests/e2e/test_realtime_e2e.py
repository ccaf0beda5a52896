"""End to end: real mitmdump with the gateway, the simulated upstream, real clients, /metrics compared
to exactly what the upstream sent."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest
from mitmproxy import io

from ai_gateway_tools.harness import GatewayProcess, expected_samples, scrape, select, usage_only
from ai_gateway_tools.harness import assert_metered_exactly as metered_exactly
from ai_gateway_tools.harness import parse_errors as count_parse_errors
from ai_gateway_tools.simulators.realtime import Simulator, SimulatorThread, junk_frames

from ..clients import raw_session, respond, sdk_session, websocket_base

PARSE_ERRORS = "agentgateway_gateway_parse_errors_total"
POLICIES = Path(__file__).resolve().parents[2] / "policies"


def metered(gateway: GatewayProcess, **labels: str) -> dict:
    return select(scrape(gateway.metrics_url), **labels)


def assert_metered_exactly(gateway: GatewayProcess, simulator: Simulator, model: str, responses: int) -> None:
    sent = simulator.usage_for(model)
    assert sum(e.kind == "response" for e in sent) == responses
    metered_exactly(gateway.metrics_url, model, sent)


def parse_errors(gateway: GatewayProcess) -> float:
    return count_parse_errors(gateway.metrics_url)


def test_ga_sdk_session_is_metered_exactly(gateway, simulator, model):
    done = asyncio.run(sdk_session(gateway.url, model))
    sent = simulator.usage_for(model)
    assert [d.response.usage.input_tokens for d in done] == [e.usage["input_tokens"] for e in sent]
    assert {e.response_model for e in sent} == {f"{model}-2025-08-28"}
    assert_metered_exactly(gateway, simulator, model, responses=3)


def test_realtime_latency_from_response_create_to_first_delta_and_done(gateway, simulator, model):
    asyncio.run(sdk_session(gateway.url, model))
    samples = metered(gateway, gen_ai_request_model=model)
    labels = {"gen_ai_operation_name": "realtime", "gen_ai_response_model": f"{model}-2025-08-28"}
    for metric in ("time_to_first_token", "time_per_output_token"):
        (count,) = [v for (name, ls), v in samples.items() if name == f"agentgateway_gen_ai_server_{metric}_count"]
        (total,) = [v for (name, ls), v in samples.items() if name == f"agentgateway_gen_ai_server_{metric}_sum"]
        assert count == 3
        assert 0 < total < 30
        assert all(labels.items() <= dict(ls).items() for (name, ls) in samples if metric in name)


def test_beta_sdk_session_is_metered_exactly(gateway, simulator, model):
    done = asyncio.run(sdk_session(gateway.url, model, beta=True))
    assert len(done) == 3
    assert simulator.handshakes[-1].query.get("model") == model
    assert ("openai-beta", "realtime=v1") in simulator.handshakes[-1].headers
    assert_metered_exactly(gateway, simulator, model, responses=3)


def test_each_response_is_metered_while_the_session_is_open(gateway, simulator, model):
    async def session() -> list[float]:
        sums = []
        url = f"{websocket_base(gateway.url)}/v1/realtime?model={model}"
        import websockets

        async with websockets.connect(url) as ws:
            for _ in range(3):
                await respond(ws)
                samples = await asyncio.to_thread(
                    metered, gateway, gen_ai_request_model=model, gen_ai_token_type="output"
                )
                sums.append(sum(v for (name, _), v in samples.items() if name.endswith("_count")))
        return sums

    assert asyncio.run(session()) == [1, 2, 3]
    assert_metered_exactly(gateway, simulator, model, responses=3)


def test_concurrent_responses_are_all_counted(gateway, simulator, model):
    done = asyncio.run(sdk_session(gateway.url, model, metadata=[{"sim_deltas": "8"}] * 4, concurrent=True))
    assert len({d.response.id for d in done}) == 4
    assert_metered_exactly(gateway, simulator, model, responses=4)


def test_cancelled_failed_and_incomplete_responses_are_counted(gateway, simulator, model):
    statuses = ["completed", "cancelled", "failed", "incomplete"]
    done = asyncio.run(sdk_session(gateway.url, model, metadata=[{"sim_status": s} for s in statuses]))
    assert [d.response.status for d in done] == statuses
    assert_metered_exactly(gateway, simulator, model, responses=4)
    responses = metered(gateway, gen_ai_request_model=model)
    assert {dict(labels)["status"] for (name, labels) in responses if name.endswith("_responses_total")} == set(
        statuses
    )


def test_fragmented_response_done_is_metered(gateway, simulator, model):
    asyncio.run(sdk_session(gateway.url, model, metadata=[{"sim_fragment": "1"}, {}]))
    assert_metered_exactly(gateway, simulator, model, responses=2)


def test_extension_header_is_stripped_before_the_upstream(gateway, simulator, model):
    url = f"{websocket_base(gateway.url)}/v1/realtime?model={model}"
    _, extensions = asyncio.run(raw_session(url, [{"type": "response.create"}]))
    handshake = next(h for h in simulator.handshakes if h.query.get("model") == model)
    assert not [name for name, _ in handshake.headers if name == "sec-websocket-extensions"]
    assert extensions == []
    assert_metered_exactly(gateway, simulator, model, responses=1)


@pytest.mark.parametrize("relay", ["messages", "frames"])
def test_compressed_session_is_metered(simulator, model, tmp_path, relay):
    """A route whose policy keeps the client's permessage-deflate offer: negotiated on the messages
    path; the frames path (the default) drops the offer and relays the session uncompressed."""
    policy = tmp_path / "keep-compression.yaml"
    policy.write_text("routes:\n  /realtime: Realtime\n")
    model = f"{model}-{relay}"
    options = {"gateway_policy": str(policy), "gateway_relay": relay, "termlog_verbosity": "debug"}
    with GatewayProcess(simulator.url, options=options) as gateway:
        url = f"{websocket_base(gateway.url)}/v1/realtime?model={model}"
        events = [
            {"type": "response.create"},
            {"type": "response.create", "response": {"metadata": {"sim_fragment": "1"}}},
        ]
        _, extensions = asyncio.run(raw_session(url, events, count=2))
        handshake = next(h for h in simulator.handshakes if h.query.get("model") == model)
        offered = [value for name, value in handshake.headers if name == "sec-websocket-extensions"]
        assert_metered_exactly(gateway, simulator, model, responses=2)
    if relay == "messages":
        assert extensions == ["permessage-deflate"] and "permessage-deflate" in "".join(offered)
    else:
        assert extensions == [] and offered == []
    assert ("as frames" in gateway.log()) == (relay == "frames")


def test_malformed_frames_are_relayed_unchanged_and_counted(gateway, simulator, model):
    before = parse_errors(gateway)
    url = f"{websocket_base(gateway.url)}/v1/realtime?model={model}"
    junk = junk_frames()
    lookalikes = sum(isinstance(f, str) and f.startswith('{"type": "response.done"') and f.endswith("}") for f in junk)
    events = [{"type": "response.create", "response": {"metadata": {"sim_junk": "1"}}}]
    received, _ = asyncio.run(raw_session(url, events, count=lookalikes + 1))
    # The junk arrives byte for byte, in order, between the session's other events.
    position = received.index(junk[0])
    assert received[position : position + len(junk)] == junk
    assert parse_errors(gateway) - before == len(junk)
    assert_metered_exactly(gateway, simulator, model, responses=1)
    # The session survived: a second session on the same gateway still works.
    asyncio.run(sdk_session(gateway.url, model, metadata=[{}]))
    assert_metered_exactly(gateway, simulator, model, responses=2)


def test_transcription_usage_is_metered_under_the_transcription_model(gateway, simulator, model):
    audio = base64.b64encode(bytes(48_000)).decode()  # one second of PCM16 at 24 kHz
    events = [
        {
            "type": "session.update",
            "session": {"type": "realtime", "audio": {"input": {"transcription": {"model": "gpt-4o-mini-transcribe"}}}},
        },
        {"type": "input_audio_buffer.append", "audio": audio},
        {"type": "input_audio_buffer.commit"},
        {"type": "input_audio_buffer.append", "audio": audio},
        {"type": "input_audio_buffer.commit"},
        {"type": "response.create"},
    ]
    url = f"{websocket_base(gateway.url)}/v1/realtime?model={model}"
    asyncio.run(raw_session(url, events))
    sent = simulator.usage_for(model)
    transcriptions = [e for e in sent if e.kind == "transcription"]
    assert [e.usage["type"] for e in transcriptions] == ["tokens", "duration"]
    assert {e.response_model for e in transcriptions} == {"gpt-4o-mini-transcribe"}
    assert_metered_exactly(gateway, simulator, model, responses=1)


def test_transcription_only_session(gateway, simulator):
    audio = base64.b64encode(bytes(24_000)).decode()
    events = [{"type": "input_audio_buffer.append", "audio": audio}, {"type": "input_audio_buffer.commit"}]
    url = f"{websocket_base(gateway.url)}/v1/realtime?intent=transcription"
    before = metered(gateway, gen_ai_operation_name="transcription", gen_ai_request_model="unknown")
    asyncio.run(raw_session(url, events, until="conversation.item.input_audio_transcription.completed"))
    sent = [e for e in simulator.usage_for("unknown") if e.kind == "transcription"]
    assert sent and sent[-1].response_model == "gpt-4o-transcribe"
    after = metered(gateway, gen_ai_operation_name="transcription", gen_ai_request_model="unknown")
    delta = {key: value - before.get(key, 0) for key, value in usage_only(after).items() if value != before.get(key, 0)}
    assert delta == {key: value for key, value in expected_samples(sent[-1:]).items() if value}


def test_azure_deployment_url(simulator, model):
    with GatewayProcess(
        simulator.url,
        options={"gateway_policy": str(POLICIES / "azure-openai.yaml")},
        env={"AZURE_OPENAI_API_KEY": "azure-upstream-key"},
    ) as gateway:
        url = f"{websocket_base(gateway.url)}/openai/realtime?api-version=2025-04-01-preview&deployment={model}"
        asyncio.run(raw_session(url, [{"type": "response.create"}], headers={"api-key": "client-key"}))
        handshake = next(h for h in simulator.handshakes if h.query.get("deployment") == model)
        assert ("api-key", "azure-upstream-key") in handshake.headers
        assert not [v for n, v in handshake.headers if n == "authorization" or v == "client-key"]
        assert_metered_exactly_azure = expected_samples(simulator.usage_for(model), system="azure.ai.openai")
        assert usage_only(metered(gateway, gen_ai_request_model=model)) == assert_metered_exactly_azure


def test_policy_model_override_rewrites_the_realtime_query(simulator, model, tmp_path):
    policy = tmp_path / "override.yaml"
    policy.write_text(f"routes:\n  /realtime:\n    type: Realtime\n    model: {model}\n")
    with GatewayProcess(simulator.url, options={"gateway_policy": str(policy)}) as gateway:
        asyncio.run(sdk_session(gateway.url, "gpt-client-asked-for-this", metadata=[{}]))
        assert simulator.handshakes[-1].query["model"] == model
        assert_metered_exactly(gateway, simulator, model, responses=1)
        assert not metered(gateway, gen_ai_request_model="gpt-client-asked-for-this")


def test_upstream_key_is_injected_and_never_shown(simulator, model, tmp_path):
    secret = "sk-upstream-SECRET-7f3a9c"
    policy = tmp_path / "auth.yaml"
    policy.write_text(
        "auth:\n  env: GATEWAY_TEST_KEY\nroutes:\n  /realtime:\n    type: Realtime\n    request:\n      remove: [sec-websocket-extensions]\n"
    )
    saved = tmp_path / "flows.mitm"
    gateway = GatewayProcess(
        simulator.url,
        options={
            "gateway_policy": str(policy),
            "flow_detail": "4",
            "save_stream_file": str(saved),
            "gateway_websocket_history": "all",
        },
        env={"GATEWAY_TEST_KEY": secret},
    )
    with gateway:
        asyncio.run(sdk_session(gateway.url, model, metadata=[{}]))
        url = f"{websocket_base(gateway.url)}/v1/realtime?model={model}"
        asyncio.run(
            raw_session(
                url, [{"type": "response.create"}], subprotocols=["realtime", "openai-insecure-api-key.sk-browser-key"]
            )
        )
        metrics_text = json.dumps(sorted(map(str, scrape(gateway.metrics_url).items())))
    handshakes = [h for h in simulator.handshakes if h.query.get("model") == model]
    assert len(handshakes) == 2
    for handshake in handshakes:
        assert [v for n, v in handshake.headers if n == "authorization"] == [f"Bearer {secret}"]
        assert not [v for n, v in handshake.headers if "sk-client-own-key" in v or "sk-browser-key" in v]
    assert "realtime" in dict(handshakes[1].headers)["sec-websocket-protocol"]
    log = gateway.log()
    assert "sec-websocket-key" in log.lower(), "flow_detail=4 should print request headers"
    for channel in (log, saved.read_bytes().decode(errors="replace"), metrics_text):
        assert secret not in channel
    with saved.open("rb") as f:
        saved_flows = list(io.FlowReader(f).stream())
    assert len(saved_flows) == 2 and not [f for f in saved_flows if "authorization" in f.request.headers]


def test_agentgateway_operation_names_label_realtime_usage_chat(simulator, model):
    """gateway_operation_names=agentgateway: the same samples, with Realtime's operation named chat."""
    with GatewayProcess(simulator.url, options={"gateway_operation_names": "agentgateway"}) as gateway:
        asyncio.run(sdk_session(gateway.url, model))
        samples = usage_only(metered(gateway, gen_ai_request_model=model))

    def as_agentgateway(labels: frozenset) -> frozenset:
        return frozenset(
            ("gen_ai_operation_name", "chat") if kv == ("gen_ai_operation_name", "realtime") else kv for kv in labels
        )

    expected = {
        (name, as_agentgateway(labels)): v for (name, labels), v in expected_samples(simulator.usage_for(model)).items()
    }
    assert {dict(labels)["gen_ai_operation_name"] for _, labels in expected} == {"chat"}
    assert samples == expected


def test_webrtc_sideband_is_metered_under_the_session_model():
    """`/v1/realtime?call_id=` names no model: the request model is session.created's, not unknown."""
    with SimulatorThread(seed=7) as simulator, GatewayProcess(simulator.url) as gateway:
        url = f"{websocket_base(gateway.url)}/v1/realtime?call_id=rtc_1"
        asyncio.run(raw_session(url, [{"type": "response.create"}] * 2, count=2))
        sent = simulator.usage_for("unknown")
        (session_model,) = {e.response_model for e in sent}
        expected = {
            (
                name,
                frozenset(
                    ("gen_ai_request_model", session_model) if kv == ("gen_ai_request_model", "unknown") else kv
                    for kv in labels
                ),
            ): v
            for (name, labels), v in expected_samples(sent).items()
        }
        assert len(sent) == 2
        assert usage_only(metered(gateway, gen_ai_request_model=session_model)) == expected
        assert not metered(gateway, gen_ai_request_model="unknown")


def test_a_cancelled_response_and_a_function_call_round_trip_are_metered_exactly(gateway, simulator, model):
    """A barge-in (response.cancel mid-answer) bills what the answer produced; a tool call, its
    output and the next response bill two responses: /metrics agrees with the simulator's ledger."""

    async def session() -> list[str]:
        import websockets

        async with websockets.connect(f"{websocket_base(gateway.url)}/v1/realtime?model={model}") as ws:
            await ws.recv()
            slow = {"sim_deltas": "100", "sim_delta_ms": "20"}  # two seconds of answer: the cancel comes first
            await ws.send(json.dumps({"type": "response.create", "response": {"metadata": slow}}))
            while json.loads(await ws.recv())["type"] != "response.output_audio.delta":
                pass
            await ws.send(json.dumps({"type": "response.cancel"}))
            statuses = [await done_status(ws)]
            call = {"sim_function_call": "get_weather"}
            await ws.send(json.dumps({"type": "response.create", "response": {"metadata": call}}))
            statuses.append(await done_status(ws))
            output = {"type": "function_call_output", "call_id": "call_x", "output": "{}"}
            await ws.send(json.dumps({"type": "conversation.item.create", "item": output}))
            await ws.send(json.dumps({"type": "response.create"}))
            statuses.append(await done_status(ws))
            return statuses

    async def done_status(ws) -> str:  # type: ignore[no-untyped-def]
        while (event := json.loads(await ws.recv()))["type"] != "response.done":
            pass
        return event["response"]["status"]

    assert asyncio.run(session()) == ["cancelled", "completed", "completed"]
    sent = simulator.usage_for(model)
    assert [e.status for e in sent] == ["cancelled", "completed", "completed"]
    assert_metered_exactly(gateway, simulator, model, responses=3)
