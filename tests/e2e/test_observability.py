"""The access log, the traces and voice-turn latency, end to end: the real gateway (mitmdump and
scripts/serve), the simulated upstreams with server-VAD turns, the openai SDK, a real OTLP/HTTP
receiver decoding the exporter's protobuf; each compared to the simulator's ledger."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import random
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from openai import AsyncOpenAI, OpenAI
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ai_gateway.accounting import access_log
from ai_gateway.accounting.observer import ResponseRecord
from ai_gateway.accounting.tracing import Tracing
from ai_gateway.accounting.usage import TokenUsage
from ai_gateway_tools.harness import GatewayProcess, free_port, scrape, select
from ai_gateway_tools.simulators.http import HttpSimulator
from ai_gateway_tools.simulators.otlp import OtlpReceiver, ReceivedSpan
from ai_gateway_tools.simulators.realtime import Simulator, SimulatorThread

from ..clients import wait_until, websocket_base
from ..conftest import LAUNCHERS

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
CHUNK = 4800  # bytes of PCM16 per append: 100 ms
VAD_CHUNKS = 3  # appends until server VAD hears the speech stop
THINKING = 0.15  # seconds the simulated upstream waits before answering a server-VAD turn
PAUSE = 0.25  # seconds the client waits between committing its turn and asking for the answer
# The gateway times frames as it relays them: on a loaded machine one can reach it a few ms late.
RELAY_SLACK = 0.03
PRICED_MODEL = "gpt-realtime"  # in the price database, so that lines carry a cost
AUDIO = base64.b64encode(bytes(CHUNK)).decode()
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100"}  # batches every 100 ms instead of 5 s
EXPORT_LOG = "cannot export traces"


@pytest.fixture
def vad_simulator() -> Iterator[Simulator]:
    """A fresh upstream per test: its ledger is this test's, whatever model names it uses."""
    with SimulatorThread(seed=16, vad_speech_bytes=VAD_CHUNKS * CHUNK, vad_response_delay=THINKING) as sim:
        yield sim


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


async def voice_session(gateway_url: str, model: str, headers: dict[str, str] | None = None) -> None:
    """Three responses: a server-VAD turn the upstream answers by itself, a turn the client commits
    and then asks for, and a response asked for with no turn."""
    client = AsyncOpenAI(api_key="sk-client", websocket_base_url=websocket_base(gateway_url) + "/v1")
    async with client.realtime.connect(model=model, extra_headers=headers or {}) as connection:

        async def until_done() -> None:
            async for event in connection:
                if event.type == "response.done":
                    return

        vad = {"type": "server_vad"}
        await connection.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": vad}}})  # type: ignore[typeddict-item]
        for _ in range(VAD_CHUNKS):
            await connection.input_audio_buffer.append(audio=AUDIO)
        await until_done()
        await connection.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
        await connection.input_audio_buffer.append(audio=AUDIO)
        await connection.input_audio_buffer.commit()
        await asyncio.sleep(PAUSE)  # the interval the turn latency must include and TTFT must not
        await connection.response.create()
        await until_done()
        await connection.response.create()
        await until_done()


def json_lines(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def responses_of(sim: Simulator, model: str) -> list[dict[str, Any]]:
    return [e.usage for e in sim.usage_for(model) if e.kind == "response"]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_access_log_lines_match_the_ledger_and_nothing_is_printed_per_message(launcher, vad_simulator):
    model = PRICED_MODEL
    with GatewayProcess(vad_simulator.url, launcher=launcher, options={"gateway_access_log": "json"}) as gw:
        asyncio.run(voice_session(gw.url, model))
        wait_until(lambda: any(line["event"] == "session" for line in json_lines(gw.log())))
        samples = scrape(gw.metrics_url)
    log = gw.log()
    lines = json_lines(log)
    sent = responses_of(vad_simulator, model)
    responses = [line for line in lines if line["event"] == "response"]
    assert len(sent) == 3
    assert [(r["input_tokens"], r["cached_tokens"], r["output_tokens"]) for r in responses] == [
        (u["input_tokens"], u["input_token_details"]["cached_tokens"], u["output_tokens"]) for u in sent
    ]
    assert {r["request_model"] for r in responses} == {model}
    assert {r["response_model"] for r in responses} == {f"{model}-2025-08-28"}
    assert all(r["status"] == "completed" and r["cost_usd"] > 0 and r["response_id"] for r in responses)
    cost = sum(v for (name, _), v in samples.items() if name == "agentgateway_gen_ai_client_cost_usd_total")
    assert sum(r["cost_usd"] for r in responses) == pytest.approx(cost)
    server_turn, committed_turn, no_turn = responses
    # Server VAD: the upstream's own response, its TTFT measured from speech_stopped (after THINKING).
    assert server_turn["turn_latency_s"] == server_turn["ttft_s"] >= THINKING - RELAY_SLACK
    # A committed turn: the client's pause counts towards the turn, not towards time to first token.
    assert committed_turn["turn_latency_s"] >= PAUSE - RELAY_SLACK
    assert committed_turn["ttft_s"] < PAUSE - RELAY_SLACK
    assert no_turn["turn_latency_s"] is None and no_turn["ttft_s"] is not None
    (session,) = [line for line in lines if line["event"] == "session"]
    assert session["responses"] == 3
    assert session["input_tokens"] == sum(u["input_tokens"] for u in sent)
    assert session["output_tokens"] == sum(u["output_tokens"] for u in sent)
    assert session["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in responses))
    assert (session["close_code"], session["closed_by"], session["error_type"]) == (1000, "client", None)
    # The documented command prints these lines and mitmproxy's connection lines, nothing per message.
    assert "WebSocket text message" not in log and "<< 101" not in log
    assert len(log.splitlines()) < 20
    # The voice-turn histogram has one observation per turn kind, TTFT one per measured response.
    mine = select(samples, gen_ai_request_model=model)
    turns = {
        dict(labels)["turn_end"]: value
        for (name, labels), value in mine.items()
        if name == "agentgateway_gen_ai_server_voice_turn_latency_count"
    }
    assert turns == {"speech_stopped": 1, "commit": 1}
    turn_sum = sum(v for (n, _), v in mine.items() if n == "agentgateway_gen_ai_server_voice_turn_latency_sum")
    assert turn_sum == pytest.approx(server_turn["turn_latency_s"] + committed_turn["turn_latency_s"], abs=1e-3)
    ttft = sum(v for (n, _), v in mine.items() if n == "agentgateway_gen_ai_server_time_to_first_token_count")
    assert ttft == 3


def test_text_access_log_is_one_readable_line_per_response_and_session(vad_simulator, model):
    with GatewayProcess(vad_simulator.url) as gw:  # text is the default
        asyncio.run(voice_session(gw.url, model))
        wait_until(lambda: " session Realtime " in gw.log())
    lines = [line for line in gw.log().splitlines() if " Realtime " in line]
    assert [line.split()[1] for line in lines] == ["response"] * 3 + ["session"]
    sent = responses_of(vad_simulator, model)
    for line, usage in zip(lines, sent, strict=False):
        fields = dict(pair.split("=", 1) for pair in line.split()[3:])
        assert int(fields["input_tokens"]) == usage["input_tokens"]
        assert int(fields["output_tokens"]) == usage["output_tokens"]
        assert fields["request_model"] == model
    assert "closed_by=client" in lines[-1] and "close_code=1000" in lines[-1]


def test_flow_detail_set_by_the_user_brings_mitmdumps_lines_back(vad_simulator, model):
    # mitmdump's per-message lines are its WebSocket layer's (the frames path has no messages).
    options = {"gateway_relay": "messages"}
    with GatewayProcess(vad_simulator.url, args=["--flow-detail", "2"], options=options) as gw:
        asyncio.run(voice_session(gw.url, model))
        wait_until(lambda: " session Realtime " in gw.log())
    assert "WebSocket text message" in gw.log()


def spans_of(receiver: OtlpReceiver, trace_id: str, count: int) -> list[ReceivedSpan]:
    return wait_until(lambda: len(found := [s for s in receiver.spans if s.trace_id == trace_id]) >= count and found)


def test_realtime_spans_carry_the_ledgers_usage_under_the_clients_trace(vad_simulator, receiver, model):
    options = {"gateway_otlp_endpoint": receiver.url, "gateway_access_log": "off"}
    with GatewayProcess(vad_simulator.url, options=options, env=FAST_EXPORT) as gw:
        asyncio.run(voice_session(gw.url, model, {"traceparent": TRACEPARENT}))
        spans = spans_of(receiver, CLIENT_TRACE, 4)
    (session,) = [s for s in spans if s.name == f"realtime {model}"]
    children = sorted((s for s in spans if s.parent_span_id == session.span_id), key=lambda s: s.start_ns)
    assert len(spans) == 4 and len(children) == 3
    assert session.parent_span_id == CLIENT_SPAN  # a child of the client's span
    assert session.resource["service.name"] == "ai-gateway"
    sent = responses_of(vad_simulator, model)
    for span, usage in zip(children, sent, strict=True):
        attributes = span.attributes
        assert span.name == f"realtime.response {model}"
        assert attributes["gen_ai.usage.input_tokens"] == usage["input_tokens"]
        assert attributes["gen_ai.usage.output_tokens"] == usage["output_tokens"]
        assert attributes["gen_ai.usage.cache_read.input_tokens"] == usage["input_token_details"]["cached_tokens"]
        assert attributes["ai_gateway.usage.input_tokens.audio"] == usage["input_token_details"]["audio_tokens"]
        assert attributes["ai_gateway.usage.output_tokens.text"] == usage["output_token_details"]["text_tokens"]
        assert attributes["gen_ai.response.id"].startswith("resp_")
        assert attributes["ai_gateway.response.status"] == "completed"
        assert session.start_ns <= span.start_ns <= span.end_ns <= session.end_ns
    assert children[0].attributes["ai_gateway.voice_turn.latency"] >= THINKING - RELAY_SLACK
    assert "ai_gateway.voice_turn.latency" not in children[2].attributes
    assert session.attributes["gen_ai.usage.input_tokens"] == sum(u["input_tokens"] for u in sent)
    assert session.attributes["gen_ai.conversation.id"].startswith("sess_")
    assert session.attributes["ai_gateway.session.responses"] == 3
    # The upstream saw the gateway's span as the parent, in the client's trace.
    handshake = vad_simulator.handshakes[-1]
    assert dict(handshake.headers)["traceparent"] == f"00-{CLIENT_TRACE}-{session.span_id}-01"
    assert EXPORT_LOG not in gw.log()


@pytest.fixture(scope="module")
def http_simulator() -> Iterator[HttpSimulator]:
    with SimulatorThread(server=HttpSimulator(seed=16)) as sim:
        yield sim


def test_http_requests_are_logged_and_traced_as_the_ledger_says(http_simulator, receiver, model):
    options = {"gateway_otlp_endpoint": receiver.url, "gateway_access_log": "json"}
    with GatewayProcess(http_simulator.url, options=options, env=FAST_EXPORT) as gw:
        client = OpenAI(api_key="sk-client", base_url=f"{gw.url}/v1", max_retries=0)
        headers = {"traceparent": TRACEPARENT}
        messages = [{"role": "user", "content": "hi"}]
        client.chat.completions.create(model=model, messages=messages, extra_headers=headers)  # type: ignore[arg-type]
        stream = client.chat.completions.create(model=model, messages=messages, stream=True, extra_headers=headers)  # type: ignore[arg-type]
        for _ in stream:
            pass
        wait_until(lambda: len([s for s in receiver.spans if s.name == f"chat {model}"]) == 2)
        wait_until(lambda: len([line for line in json_lines(gw.log()) if line.get("request_model") == model]) == 2)
    sent = [e.usage for e in http_simulator.usage_for(model)]
    lines = [line for line in json_lines(gw.log()) if line.get("request_model") == model]
    assert [(line["input_tokens"], line["output_tokens"]) for line in lines] == [
        (u["prompt_tokens"], u["completion_tokens"]) for u in sent
    ]
    assert all(line["event"] == "request" and line["http_status"] == 200 for line in lines)
    assert lines[0]["ttft_s"] is None and lines[1]["ttft_s"] is not None  # only the stream has a first token
    spans = sorted((s for s in receiver.spans if s.name == f"chat {model}"), key=lambda s: s.start_ns)
    assert [s.attributes["gen_ai.usage.input_tokens"] for s in spans] == [u["prompt_tokens"] for u in sent]
    assert all(s.trace_id == CLIENT_TRACE and s.parent_span_id == CLIENT_SPAN for s in spans)
    forwarded = [dict(r.headers).get("traceparent") for r in http_simulator.requests[-2:]]
    assert forwarded == [f"00-{CLIENT_TRACE}-{s.span_id}-01" for s in spans]
    assert all("sk-" not in json.dumps(s.attributes) for s in spans)  # no credential in a trace


def fastest_sessions(plain: GatewayProcess, traced: GatewayProcess, model: str, runs: int = 3) -> tuple[float, float]:
    """The fastest of `runs` voice sessions through each gateway (after one to warm each up), taken
    in turn: a neighbour's burst on a loaded machine slows a session or two, a cost of the relay's
    would slow every session through it. Seconds, (plain, traced)."""
    seconds: dict[GatewayProcess, list[float]] = {plain: [], traced: []}
    for run in range(runs + 1):
        for gateway, taken in seconds.items():
            start = time.monotonic()
            asyncio.run(voice_session(gateway.url, model))
            if run:
                taken.append(time.monotonic() - start)
    return min(seconds[plain]), min(seconds[traced])


@pytest.mark.slow
def test_a_dead_collector_costs_the_relay_nothing_and_logs_one_line(vad_simulator, model):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    options = {"gateway_otlp_endpoint": dead, "gateway_access_log": "off"}
    with (
        GatewayProcess(vad_simulator.url, options={"gateway_access_log": "off"}) as plain,
        GatewayProcess(vad_simulator.url, options=options, env=FAST_EXPORT) as gw,
    ):
        without, with_dead = fastest_sessions(plain, gw, model)
        key = ("agentgateway_gateway_trace_spans_dropped_total", frozenset({("reason", "export_failed")}))
        # Four sessions of four spans each: every one of them is counted as dropped.
        dropped = wait_until(lambda: scrape(gw.metrics_url).get(key, 0) >= 16 and scrape(gw.metrics_url)[key])
    # A session includes fixed waits (THINKING, PAUSE) of 0.4 s; anything the export cost the
    # relay would show on top of them.
    assert with_dead < without * 1.5 + 0.2, (with_dead, without)
    assert dropped == 16
    log = gw.log()
    assert log.count(EXPORT_LOG) == 1
    assert "opentelemetry" not in log and "Traceback" not in log


@pytest.mark.slow
def test_a_collector_that_never_answers_fills_the_queue_not_the_relay(vad_simulator, model):
    """The collector accepts the connection and never replies: the export thread waits (30 s), the
    bounded queue (8 spans here) overflows, and sessions run as fast as without traces."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # the kernel completes handshakes; nothing ever reads or answers
        env = {**FAST_EXPORT, "OTEL_BSP_MAX_QUEUE_SIZE": "8", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4"}
        env["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"] = "30"
        options = {"gateway_otlp_endpoint": f"http://127.0.0.1:{silent.getsockname()[1]}", "gateway_access_log": "off"}
        with GatewayProcess(vad_simulator.url, options={"gateway_access_log": "off"}) as plain:
            gw = GatewayProcess(vad_simulator.url, options=options, env=env).start()
            try:
                without, with_silent = fastest_sessions(plain, gw, model)
                key = ("agentgateway_gateway_trace_spans_dropped_total", frozenset({("reason", "queue_full")}))
                dropped = scrape(gw.metrics_url).get(key, 0)
            finally:
                stopping = time.monotonic()
                gw.stop()
                stopped_in = time.monotonic() - stopping
    assert with_silent < without * 1.5 + 0.2, (with_silent, without)
    assert dropped >= 1  # 16 spans, at most one batch in the stuck export and 8 queued
    assert stopped_in < 10  # the last batch is waited for 2 s at most, not the export's 30 s
    assert EXPORT_LOG not in gw.log() and "opentelemetry" not in gw.log()


# --- the per-response path, in process: what the faster code must keep exactly ---------------------

RESPONSE_USAGE = TokenUsage(
    input=132,
    output=121,
    cache_read=64,
    input_by_modality=(("text", 119), ("audio", 13)),
    cache_read_by_modality=(("text", 64), ("audio", 0)),
    output_by_modality=(("text", 30), ("audio", 91)),
)


def response_record(flow_id: str, status: str = "completed", end: float = 1796122658.680189) -> ResponseRecord:
    return ResponseRecord(
        flow_id, "Realtime", "key:ab12", "realtime", "openai", "gpt-realtime", "gpt-realtime-2025-08-28",
        "resp_1", status, RESPONSE_USAGE, 0.0069656, end, 0.8123, 0.0412, 0.3456,
    )  # fmt: skip


def test_access_log_times_are_datetimes_isoformat_to_the_millisecond() -> None:
    def isoformat(epoch: float) -> str:
        return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    rng = random.Random(16)
    second = 1796122658
    edges = [second + k + f for k in range(3) for f in (0.0, 0.0004999, 0.0005, 0.999, 0.9995, 0.9999994, 0.9999996)]
    for epoch in [*edges, *(second + rng.uniform(0, 5) for _ in range(20_000))]:
        assert access_log._time(epoch) == isoformat(epoch), epoch


def test_access_log_lines_keep_their_format() -> None:
    fields = access_log.response_fields(response_record("f1"))
    assert access_log.text_line(fields) == (
        "2026-12-01T10:57:38.680Z response Realtime operation=realtime client_key=key:ab12 "
        "request_model=gpt-realtime response_model=gpt-realtime-2025-08-28 response_id=resp_1 status=completed "
        "input_tokens=132 cached_tokens=64 output_tokens=121 cost_usd=0.0069656 duration_s=0.8123 ttft_s=0.0412 "
        "turn_latency_s=0.3456 flow_id=f1"
    )
    assert json.loads(access_log.json_line(fields)) == fields
    assert access_log.json_line(fields) == json.dumps(fields, separators=(",", ":"))
    quoted = access_log.text_line({"time": "t", "event": "e", "route": "r", "a": "x y", "b": 'q"', "c": "k=v", "d": ""})
    assert quoted == 't e r a="x y" b="q\\"" c="k=v" d=""'
    assert (
        access_log.text_line({"time": "t", "event": "e", "route": "r", "n": 1000, "ok": True}) == "t e r n=1000 ok=True"
    )


def spans_both_ways(monkeypatch: pytest.MonkeyPatch, record: ResponseRecord, traceparent: str = "") -> list[Any]:
    """The response's span built finished, then by the SDK's own path, from one session span each."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")
    tracing = Tracing("http://127.0.0.1:9/v1/traces", lambda reason, count: None)
    exporter = InMemorySpanExporter()
    tracing.processor.exporter.exporter = exporter
    limit = tracing.prebuilt_limit
    try:
        for flow_id, prebuilt_limit in (("prebuilt", limit), ("sdk", 0)):
            tracing.prebuilt_limit = prebuilt_limit
            tracing.begin(flow_id, {"traceparent": traceparent} if traceparent else {}, "realtime", "gpt-realtime")
            tracing.response_finished(dataclasses.replace(record, flow_id=flow_id))
        tracing.provider.force_flush()
        return [span for span in exporter.get_finished_spans() if ".response" in span.name]
    finally:
        tracing.shutdown()


@pytest.mark.parametrize("status", ["completed", "failed"])
def test_a_response_span_built_finished_is_the_one_the_sdk_builds(monkeypatch: pytest.MonkeyPatch, status: str) -> None:
    assert Tracing("http://127.0.0.1:9/v1/traces", lambda reason, count: None).prebuilt_limit > 30
    prebuilt, sdk = spans_both_ways(monkeypatch, response_record("", status), TRACEPARENT)
    for span in (prebuilt, sdk):
        assert span.parent is not None and span.parent.span_id != int(CLIENT_SPAN, 16)  # a child of its session
        assert span.context.trace_id == span.parent.trace_id == int(CLIENT_TRACE, 16)
    assert prebuilt.context.span_id != sdk.context.span_id
    for read in (
        lambda s: s.name, lambda s: s.kind, lambda s: dict(s.attributes), lambda s: s.status.status_code,
        lambda s: (s.start_time, s.end_time), lambda s: s.resource, lambda s: s.instrumentation_scope,
        lambda s: (s.context.trace_flags, s.context.trace_state, s.context.is_remote), lambda s: s.parent.is_remote,
        lambda s: (s.events, s.links, s.dropped_attributes),
    ):  # fmt: skip
        assert read(prebuilt) == read(sdk)
    assert (prebuilt.attributes.get("error.type") == "failed") is (status == "failed")


def test_a_response_of_an_unsampled_session_has_no_span_either_way(monkeypatch: pytest.MonkeyPatch) -> None:
    assert spans_both_ways(monkeypatch, response_record(""), f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00") == []


def test_span_limits_from_the_environment_take_the_sdks_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "5")
    assert Tracing("http://127.0.0.1:9/v1/traces", lambda reason, count: None).prebuilt_limit == 5
    (prebuilt, sdk) = spans_both_ways(monkeypatch, response_record(""))
    assert len(prebuilt.attributes) == len(sdk.attributes) == 5
    monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "4")
    assert Tracing("http://127.0.0.1:9/v1/traces", lambda reason, count: None).prebuilt_limit == 0
