"""The simulated Realtime upstream, over real sockets: the official SDK and plain websockets clients.

The gateway's end-to-end tests trust the simulator's ledger as ground truth, so these tests pin
down that what went out on the wire is exactly what the ledger says.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest
from openai import AsyncOpenAI
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as sync_connect

from ai_gateway_tools.simulators.realtime import (
    SentUsage,
    Simulator,
    SimulatorThread,
    is_unbilled_response,
    junk_frames,
    resolve_model,
)

from ..clients import served_module

T = TypeVar("T")
DONE = "response.done"
TRANSCRIBED = "conversation.item.input_audio_transcription.completed"
GA_DELTAS = ("response.output_audio.delta", "response.output_audio_transcript.delta")
BETA_DELTAS = ("response.audio.delta", "response.audio_transcript.delta")


def run[T](main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run with a deadline, so that a missing event fails the test instead of hanging it."""

    async def bounded() -> T:
        async with asyncio.timeout(5):
            return await main

    return asyncio.run(bounded())


def ws_url(sim: Simulator, path: str = "/v1/realtime?model=gpt-realtime") -> str:
    return sim.url.replace("http://", "ws://", 1) + path


def sdk(sim: Simulator) -> AsyncOpenAI:
    return AsyncOpenAI(api_key="sk-test", websocket_base_url=ws_url(sim, "/v1"))


Recv = Callable[[], Awaitable[str | bytes]]


async def until(recv: Recv, last: str, count: int = 1) -> list[dict[str, Any]]:
    """Events up to and including the count-th event of type `last`."""
    events: list[dict[str, Any]] = []
    while sum(e["type"] == last for e in events) < count:
        events.append(json.loads(await recv()))
    return events


async def send(ws: ClientConnection, *events: dict[str, Any]) -> None:
    for event in events:
        await ws.send(json.dumps(event))


def create(**metadata: str) -> dict[str, Any]:
    return {"type": "response.create", "response": {"metadata": metadata}}


def append(pcm_bytes: int) -> dict[str, Any]:
    return {"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(pcm_bytes)).decode()}


def assert_consistent(usage: dict[str, Any]) -> None:
    """The invariants of OpenAI's usage that the gateway may rely on."""
    inp, out = usage["input_token_details"], usage["output_token_details"]
    cached = inp["cached_tokens_details"]
    assert usage["input_tokens"] == inp["text_tokens"] + inp["audio_tokens"] + inp["image_tokens"]
    assert usage["output_tokens"] == out["text_tokens"] + out["audio_tokens"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert inp["cached_tokens"] == sum(cached.values()) <= usage["input_tokens"]
    for modality, tokens in cached.items():
        assert tokens <= inp[modality]


def test_ga_sdk_session():
    async def main() -> tuple[Simulator, dict[str, Any], list[dict[str, Any]], Any]:
        async with Simulator(seed=1) as sim, sdk(sim) as client:
            async with client.realtime.connect(model="gpt-realtime") as conn:
                created = json.loads(await conn.recv_bytes())
                await conn.response.create(response={"metadata": {"tag": "a"}})
                events = await until(conn.recv_bytes, DONE)
                parsed = conn.parse_event(json.dumps(events[-1]))
        return sim, created, events, parsed

    sim, created, events, parsed = run(main())
    assert created["type"] == "session.created"
    session = created["session"]
    assert session["type"] == "realtime" and session["model"] == "gpt-realtime-2025-08-28"
    assert session["audio"] == {"input": {"transcription": None}}
    assert [e["type"] for e in events] == [
        "response.created",
        "rate_limits.updated",
        *[GA_DELTAS[0]] * 5,
        *[GA_DELTAS[1]] * 5,
        DONE,
    ]
    assert len(base64.b64decode(events[2]["delta"])) == 4800
    response = events[-1]["response"]
    assert response["status"] == "completed" and response["metadata"] == {"tag": "a"}
    snapshot = "gpt-realtime-2025-08-28"
    assert sim.ledger == [
        SentUsage(session["id"], "response", "gpt-realtime", snapshot, "completed", response["usage"])
    ]
    assert_consistent(response["usage"])
    assert parsed.response.usage.total_tokens == response["usage"]["total_tokens"]  # the SDK reads our shape
    (handshake,) = sim.handshakes
    assert (handshake.path, handshake.query) == ("/v1/realtime", {"model": "gpt-realtime"})
    assert handshake.session_id == session["id"]
    assert ("authorization", "Bearer sk-test") in handshake.headers


def test_beta_sdk_session():
    async def main() -> tuple[Simulator, dict[str, Any], list[dict[str, Any]]]:
        async with Simulator(seed=2) as sim, sdk(sim) as client:
            async with client.beta.realtime.connect(model="gpt-4o-realtime-preview-2024-12-17") as conn:
                created = json.loads(await conn.recv_bytes())
                await conn.response.create()
                return sim, created, await until(conn.recv_bytes, DONE)

    sim, created, events = run(main())
    session = created["session"]
    assert session["model"] == "gpt-4o-realtime-preview-2024-12-17"  # already a snapshot
    assert "type" not in session and session["modalities"] == ["audio", "text"]
    assert session["input_audio_transcription"] is None
    assert {e["type"] for e in events[2:-1]} == set(BETA_DELTAS)
    assert sim.ledger[0].usage == events[-1]["response"]["usage"]
    assert ("openai-beta", "realtime=v1") in sim.handshakes[0].headers


def test_model_resolution():
    assert resolve_model("gpt-realtime") == "gpt-realtime-2025-08-28"
    assert resolve_model("gpt-realtime-2025-08-28") == "gpt-realtime-2025-08-28"
    assert resolve_model(None) == resolve_model("") == "gpt-realtime-2025-08-28"


@pytest.mark.parametrize(
    ("path", "request_model"),
    [
        ("/v1/realtime?model=m1", "m1"),
        ("/openai/realtime?api-version=2025-04-01-preview&deployment=dep", "dep"),
        ("/openai/v1/realtime?model=dep", "dep"),
        ("/v1/realtime?call_id=rtc_1", "unknown"),
    ],
)
def test_realtime_paths(path, request_model):
    async def main() -> tuple[Simulator, list[dict[str, Any]]]:
        async with Simulator() as sim, connect(ws_url(sim, path)) as ws:
            await send(ws, create())
            return sim, await until(ws.recv, DONE)

    sim, events = run(main())
    snapshot = resolve_model(None if request_model == "unknown" else request_model)
    assert events[0]["session"]["model"] == snapshot
    assert [(e.request_model, e.response_model) for e in sim.ledger] == [(request_model, snapshot)]
    assert sim.usage_for(request_model) == sim.ledger


def test_wrong_path_is_refused_with_404():
    async def main() -> tuple[Simulator, int]:
        async with Simulator() as sim:
            with pytest.raises(InvalidStatus) as refused:
                await connect(ws_url(sim, "/v1/chat/completions?model=m"))
            return sim, refused.value.response.status_code

    sim, status = run(main())
    assert status == 404
    (handshake,) = sim.handshakes
    assert (handshake.path, handshake.query) == ("/v1/chat/completions", {"model": "m"})
    assert handshake.session_id is None


def test_handshake_headers_and_compression():
    headers = [("X-Trace", "one"), ("x-trace", "two"), ("X-Gateway-Extension", "secret")]

    async def main() -> tuple[Simulator, str | None]:
        async with Simulator() as sim, connect(ws_url(sim), additional_headers=headers) as ws:
            await ws.recv()
            assert ws.response is not None
            return sim, ws.response.headers.get("Sec-WebSocket-Extensions")

    sim, extensions = run(main())
    recorded = sim.handshakes[0].headers
    assert [(n, v) for n, v in recorded if n.startswith("x-")] == [(n.lower(), v) for n, v in headers]
    assert all(n == n.lower() for n, _ in recorded)
    assert extensions is not None and extensions.startswith("permessage-deflate")


def test_browser_subprotocols_select_realtime_and_beta():
    offered = ["realtime", "openai-insecure-api-key.ek_browser", "openai-beta.realtime-v1"]

    async def main() -> tuple[str | None, dict[str, Any]]:
        async with Simulator() as sim, connect(ws_url(sim), subprotocols=offered) as ws:  # type: ignore[arg-type]
            return ws.subprotocol, json.loads(await ws.recv())

    subprotocol, created = run(main())
    assert subprotocol == "realtime"
    assert "modalities" in created["session"]  # beta session shape


def test_statuses_and_delta_counts():
    async def main() -> tuple[Simulator, list[dict[str, Any]]]:
        async with Simulator(seed=3) as sim, connect(ws_url(sim)) as ws:
            statuses = ("completed", "cancelled", "failed", "incomplete")
            await send(ws, *(create(sim_status=s, sim_deltas=str(i)) for i, s in enumerate(statuses)))
            return sim, await until(ws.recv, DONE, count=4)

    sim, events = run(main())
    done = [e["response"] for e in events if e["type"] == DONE]
    assert [d["status"] for d in done] == ["completed", "cancelled", "failed", "incomplete"]
    assert [(e.status, e.usage) for e in sim.ledger] == [(d["status"], d["usage"]) for d in done]
    audio_deltas = [e["response_id"] for e in events if e["type"] == GA_DELTAS[0]]
    assert [audio_deltas.count(d["id"]) for d in done] == [0, 1, 2, 3]


def test_text_only_response_sends_text_deltas():
    async def main() -> list[dict[str, Any]]:
        async with Simulator() as sim, connect(ws_url(sim)) as ws:
            await send(ws, {"type": "response.create", "response": {"output_modalities": ["text"]}})
            return await until(ws.recv, DONE)

    events = run(main())
    assert [e["type"] for e in events[3:-1]] == ["response.output_text.delta"] * 5
    assert "".join(e["delta"] for e in events[3:-1]) == "Hello from the simulated upstream"


def test_fragmented_response_done_arrives_intact():
    async def main() -> tuple[Simulator, list[list[str]]]:
        async with Simulator() as sim, connect(ws_url(sim)) as ws:
            await send(ws, create(sim_fragment="1"))
            messages: list[list[str]] = []
            while not messages or json.loads("".join(messages[-1]))["type"] != DONE:
                messages.append([fragment async for fragment in ws.recv_streaming()])  # type: ignore[misc]
            return sim, messages

    sim, messages = run(main())
    assert all(len(m) == 1 for m in messages[:-1])
    assert len([f for f in messages[-1] if f]) > 1, "response.done should span several frames"
    assert json.loads("".join(messages[-1]))["response"]["usage"] == sim.ledger[0].usage


def billable(usage: Any) -> bool:
    """A strict reading of a usage object: the test's own check that junk carries nothing billable."""
    if not isinstance(usage, dict):
        return False
    counts = [usage.get(k) for k in ("input_tokens", "output_tokens", "total_tokens")]
    return all(type(c) is int and 0 <= c <= 10**9 for c in counts)


def test_junk_frames_arrive_as_sent_and_stay_out_of_the_ledger():
    junk = junk_frames()

    def is_real_done(frame: str | bytes) -> bool:
        try:
            event = json.loads(frame)
        except (ValueError, RecursionError):
            return False
        is_done = isinstance(event, dict) and event.get("type") == DONE
        return is_done and event["response"]["id"] != "resp_junk"

    async def main() -> tuple[Simulator, list[str | bytes]]:
        async with Simulator() as sim, connect(ws_url(sim)) as ws:
            await send(ws, create(sim_junk="1"))
            frames = [await ws.recv()]
            while not is_real_done(frames[-1]):
                frames.append(await ws.recv())
            return sim, frames

    sim, frames = run(main())
    assert frames[-1 - len(junk) : -1] == junk  # byte for byte, binary stays binary
    billed = [e for e in sim.ledger if e.kind == "response"]
    assert sim.junk_sent == len(junk) and len(billed) == 1
    assert billed[0].usage == json.loads(frames[-1])["response"]["usage"]
    # junk response.done events with readable response objects are responses that bill nothing
    unbilled = [e for e in sim.ledger if e.kind == "unbilled_response"]
    assert len(unbilled) == sum(map(is_unbilled_response, junk)) == 8 and all(not e.usage for e in unbilled)
    assert sum(isinstance(f, bytes) for f in junk) == 1
    for frame in junk:
        try:
            event = json.loads(frame)
        except (ValueError, RecursionError):
            continue
        if isinstance(event, dict):
            assert not billable(event["response"]["usage"]), frame


def test_transcription_session_alternates_tokens_and_duration():
    async def main() -> tuple[Simulator, dict[str, Any], list[dict[str, Any]]]:
        async with Simulator(seed=4) as sim, connect(ws_url(sim, "/v1/realtime?intent=transcription")) as ws:
            created = json.loads(await ws.recv())
            commit = {"type": "input_audio_buffer.commit"}
            await send(ws, append(48_000), commit)
            await send(ws, append(48_000), append(24_006), commit)
            await send(ws, append(100), commit)
            await send(ws, create())  # transcription sessions have no responses
            return sim, created, await until(ws.recv, "error")

    sim, created, events = run(main())
    session = created["session"]
    assert "model" not in session and session["type"] == "transcription"
    assert session["audio"]["input"]["transcription"]["model"] == "gpt-4o-transcribe"
    committed = [e["item_id"] for e in events if e["type"] == "input_audio_buffer.committed"]
    transcribed = [e for e in events if e["type"] == TRANSCRIBED]
    assert [e["item_id"] for e in transcribed] == committed and len(committed) == 3
    assert all(e["content_index"] == 0 and e["transcript"] for e in transcribed)
    usages = [e["usage"] for e in transcribed]
    assert [u["type"] for u in usages] == ["tokens", "duration", "tokens"]
    assert usages[1] == {"type": "duration", "seconds": 1.5}  # 72,006 bytes rounded to 3 decimals
    for u in (usages[0], usages[2]):
        assert u["total_tokens"] == u["input_tokens"] + u["output_tokens"]
        assert u["input_token_details"] == {"text_tokens": 0, "audio_tokens": u["input_tokens"]}
    expected = [
        SentUsage(session["id"], "transcription", "unknown", "gpt-4o-transcribe", "completed", u) for u in usages
    ]
    assert sim.ledger == expected


@pytest.mark.parametrize("beta", [False, True], ids=["ga", "beta"])
def test_session_update_turns_on_transcription(beta):
    headers = {"OpenAI-Beta": "realtime=v1"} if beta else {}
    path = ("input_audio_transcription",) if beta else ("audio", "input", "transcription")
    config: dict[str, Any] = {"model": "whisper-1"}
    for key in reversed(path):
        config = {key: config}
    update = config if beta else {"type": "realtime", **config}

    async def main() -> tuple[Simulator, list[dict[str, Any]]]:
        async with Simulator() as sim, connect(ws_url(sim), additional_headers=headers) as ws:
            commit = {"type": "input_audio_buffer.commit"}
            await send(ws, append(4800), commit)
            await send(ws, {"type": "session.update", "session": update}, append(4800), commit)
            return sim, await until(ws.recv, TRANSCRIBED)

    sim, events = run(main())
    # Before the update a commit is not transcribed: session.updated directly follows it.
    assert [e["type"] for e in events] == [
        "session.created",
        "input_audio_buffer.committed",
        "session.updated",
        "input_audio_buffer.committed",
        TRANSCRIBED,
    ]
    session = events[2]["session"]
    assert session["model"] == "gpt-realtime-2025-08-28"
    for key in path:
        session = session[key]
    assert session == {"model": "whisper-1"}
    assert events[-1]["usage"]["type"] == "tokens"
    entries = [(e.kind, e.request_model, e.response_model) for e in sim.ledger]
    assert entries == [("transcription", "gpt-realtime", "whisper-1")]


@pytest.mark.parametrize("beta", [False, True])
def test_server_vad_turns_start_responses_by_themselves(beta):
    headers = {"OpenAI-Beta": "realtime=v1"} if beta else {}
    vad: dict[str, Any] = {"type": "server_vad"}
    quiet = {**vad, "create_response": False}

    def update(detection: dict[str, Any]) -> dict[str, Any]:
        session = (
            {"turn_detection": detection}
            if beta
            else {"type": "realtime", "audio": {"input": {"turn_detection": detection}}}
        )
        return {"type": "session.update", "session": session}

    async def main() -> tuple[Simulator, list[dict[str, Any]]]:
        async with Simulator(vad_speech_bytes=9600) as sim, connect(ws_url(sim), additional_headers=headers) as ws:
            await send(ws, append(4800))  # no turn detection yet: nothing but the buffer
            await send(ws, update(vad), append(4800))  # 9,600 bytes buffered: the speech stops at once
            events = await until(ws.recv, DONE)
            await send(ws, update(quiet), append(4800), append(4800))
            events += await until(ws.recv, "input_audio_buffer.committed")
            await send(ws, create(by="client"))  # the client answers the quiet turn itself
            return sim, events + await until(ws.recv, DONE)

    sim, events = run(main())
    kinds = [e["type"] for e in events if not e["type"].startswith(("response.output", "response.audio"))]
    speech = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed"]
    response = ["response.created", "rate_limits.updated", DONE]
    # The second turn's response is the client's response.create: create_response false started none.
    assert kinds == ["session.created", *(["session.updated", *speech, *response] * 2)]
    started, stopped, committed = [e for e in events if e["type"].startswith("input_audio_buffer.")][:3]
    created = [e["response"]["metadata"] for e in events if e["type"] == "response.created"]
    assert created == [None, {"by": "client"}]
    assert started["item_id"] == stopped["item_id"] == committed["item_id"]
    assert stopped["audio_end_ms"] == 200  # 9,600 bytes of 24 kHz PCM16
    assert [(e.kind, e.status) for e in sim.ledger] == [("response", "completed")] * 2
    dones = [e["response"]["usage"] for e in events if e["type"] == DONE]
    assert dones == [e.usage for e in sim.ledger]


def test_concurrent_responses_interleave():
    async def main() -> tuple[Simulator, list[dict[str, Any]]]:
        async with Simulator(audio_deltas=20) as sim, connect(ws_url(sim)) as ws:
            await send(ws, create(tag="a"), create(tag="b"))
            return sim, await until(ws.recv, DONE, count=2)

    sim, events = run(main())
    kinds = [e["type"] for e in events]
    assert kinds.count("response.created") == 2 and kinds.index(DONE) > max(
        i for i, kind in enumerate(kinds) if kind == "response.created"
    )
    owners = [e["response_id"] for e in events if "response_id" in e]
    switches = sum(a != b for a, b in zip(owners, owners[1:], strict=False))
    assert switches > 2, "the two responses' deltas should alternate on the wire"
    done = [e["response"] for e in events if e["type"] == DONE]
    assert {d["metadata"]["tag"] for d in done} == {"a", "b"}
    assert [e.usage for e in sim.ledger] == [d["usage"] for d in done]


def test_response_cancel_stops_the_deltas_at_once_and_bills_what_was_produced():
    """As OpenAI: no delta after the cancel, response.done `cancelled` at once, its whole input and
    the share of its output it produced billed, and the ledger says so."""

    async def main(cancel: bool) -> tuple[Simulator, list[dict[str, Any]], float]:
        async with Simulator(seed=7, audio_deltas=50, delta_interval=0.02) as sim, connect(ws_url(sim)) as ws:
            await ws.recv()
            await send(ws, create())
            events = await until(ws.recv, GA_DELTAS[0], count=3)
            if cancel:
                await send(ws, {"type": "response.cancel"})
            started = asyncio.get_running_loop().time()
            events += await until(ws.recv, DONE)
            return sim, events, asyncio.get_running_loop().time() - started

    sim, events, waited = run(main(cancel=True))
    _, whole, _ = run(main(cancel=False))
    done = events[-1]["response"]
    assert done["status"] == "cancelled" and waited < 0.5
    produced = sum(e["type"] in GA_DELTAS for e in events)
    assert produced < 10, "deltas kept coming after the cancel"
    planned = sum(e["type"] in GA_DELTAS for e in whole)
    full, usage = whole[-1]["response"]["usage"], done["usage"]
    assert usage["input_tokens"] == full["input_tokens"] and usage["input_token_details"] == full["input_token_details"]
    shares = {m: n * produced // planned for m, n in full["output_token_details"].items()}
    assert usage["output_token_details"] == shares and 0 < usage["output_tokens"] < full["output_tokens"]
    assert_consistent(usage)
    assert [(e.status, e.usage) for e in sim.ledger] == [("cancelled", usage)]


def test_response_cancel_names_the_response_it_stops():
    async def main() -> tuple[Simulator, list[dict[str, Any]]]:
        async with Simulator(audio_deltas=40, delta_interval=0.01) as sim, connect(ws_url(sim)) as ws:
            await ws.recv()
            await send(ws, create(tag="a"), create(tag="b"))
            events = await until(ws.recv, "response.created", count=2)
            first = events[-2]["response"]["id"]
            await send(ws, {"type": "response.cancel", "response_id": first})
            events += await until(ws.recv, DONE, count=2)
            await send(ws, {"type": "response.cancel", "response_id": first})  # over: nothing to cancel
            return sim, events + await until(ws.recv, "error")

    sim, events = run(main())
    done = {e["response"]["metadata"]["tag"]: e["response"]["status"] for e in events if e["type"] == DONE}
    assert done == {"a": "cancelled", "b": "completed"}
    assert events[-1]["error"]["code"] == "response_cancel_not_active"
    assert sorted(e.status for e in sim.ledger) == ["cancelled", "completed"]


@pytest.mark.parametrize("beta", [False, True])
def test_function_call_then_its_output_then_the_next_response(beta):
    """A response that calls a tool streams its arguments; the client adds the call's output and asks
    for the next response, as a voice agent with tools does (the SDK reads every event)."""
    arguments = '{"city": "Oslo"}'

    async def main() -> tuple[Simulator, list[Any], list[dict[str, Any]]]:
        async with Simulator(seed=5) as sim, sdk(sim) as client:
            headers = {"OpenAI-Beta": "realtime=v1"} if beta else {}
            async with client.realtime.connect(model="gpt-realtime", extra_headers=headers) as conn:
                await conn.recv_bytes()
                metadata = {"sim_function_call": "get_weather", "sim_arguments": arguments}
                await conn.response.create(response={"metadata": metadata})
                events = await until(conn.recv_bytes, DONE)
                call = events[-1]["response"]["output"][0]
                output = {"type": "function_call_output", "call_id": call["call_id"], "output": '{"temp": 4}'}
                await conn.conversation.item.create(item=output)  # type: ignore[arg-type]
                await conn.response.create()
                events += await until(conn.recv_bytes, DONE)
                parsed = [conn.parse_event(json.dumps(e)) for e in events]
        return sim, parsed, events

    sim, parsed, events = run(main())
    kinds = [e["type"] for e in events]
    first = kinds.index(DONE) + 1
    argument_deltas = ["response.function_call_arguments.delta"] * 4
    assert kinds[:first] == [
        "response.created",
        "rate_limits.updated",
        "response.output_item.added",
        *argument_deltas,
        "response.function_call_arguments.done",
        "response.output_item.done",
        DONE,
    ]
    call = events[first - 1]["response"]["output"][0]
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["arguments"] == arguments
    deltas = [e for e in events if e["type"] == argument_deltas[0]]
    assert "".join(e["delta"] for e in deltas) == arguments
    assert {e["call_id"] for e in deltas} == {call["call_id"]}
    added = ["conversation.item.created"] if beta else ["conversation.item.added", "conversation.item.done"]
    assert kinds[first : first + len(added)] == added
    item = events[first]
    assert item["previous_item_id"] == call["id"] and item["item"]["call_id"] == call["call_id"]
    assert kinds[first + len(added)] == "response.created" and kinds[-1] == DONE
    assert [e.usage for e in sim.ledger] == [e["response"]["usage"] for e in events if e["type"] == DONE]
    assert all(p.type == e["type"] for p, e in zip(parsed, events, strict=True))


def test_truncate_is_acknowledged_for_an_answer_s_audio_only():
    async def main() -> list[dict[str, Any]]:
        async with Simulator() as sim, connect(ws_url(sim)) as ws:
            await ws.recv()
            await send(ws, create(), create(sim_function_call="lookup"))
            events = await until(ws.recv, DONE, count=2)
            spoken = next(e["item_id"] for e in events if e["type"] == GA_DELTAS[0])
            called = next(e["item"]["id"] for e in events if e["type"] == "response.output_item.added")
            truncate = {"type": "conversation.item.truncate", "content_index": 0, "audio_end_ms": 150}
            await send(ws, {**truncate, "item_id": spoken}, {**truncate, "item_id": called})
            return [json.loads(await ws.recv()) for _ in range(2)]

    truncated, refused = run(main())
    assert truncated["type"] == "conversation.item.truncated"
    assert (truncated["content_index"], truncated["audio_end_ms"]) == (0, 150)
    assert refused["type"] == "error" and refused["error"]["param"] == "item_id"


def test_malformed_client_frames_get_errors_and_the_session_goes_on():
    async def main() -> list[dict[str, Any]]:
        async with Simulator() as sim, connect(ws_url(sim)) as ws:
            await ws.recv()
            await ws.send("not json")
            await ws.send(b"\x00binary")
            await send(
                ws,
                {"type": 7},
                {**create(sim_status="odd"), "event_id": "evt_client"},
                create(sim_deltas="many"),
                {"type": "input_audio_buffer.append", "audio": "not base64!"},
                {"type": "session.update", "session": "fast"},
                {"type": "conversation.item.create", "item": {}},
                {"type": "conversation.item.truncate", "item_id": "item_never", "audio_end_ms": 10},
                {"type": "response.cancel"},
                {"type": "output_audio_buffer.clear"},  # unknown to the simulator: ignored
                create(sim_deltas="0"),
            )
            return await until(ws.recv, DONE)

    events = run(main())
    errors = [e["error"] for e in events if e["type"] == "error"]
    assert [e["code"] for e in errors] == [
        "invalid_json",
        "invalid_frame",
        "invalid_event",
        "invalid_value",
        "invalid_value",
        "invalid_value",
        "invalid_type",
        "invalid_value",
        "invalid_value",
        "response_cancel_not_active",
    ]
    assert all(e["type"] == "invalid_request_error" and e["message"] for e in errors)
    assert errors[3]["event_id"] == "evt_client"
    rest = [e["type"] for e in events[len(errors) :]]
    assert rest == ["response.created", "rate_limits.updated", *[GA_DELTAS[1]] * 5, DONE]


def test_usage_is_deterministic_per_seed_and_varied():
    async def usages(seed: int) -> list[dict[str, Any]]:
        sim = Simulator(seed=seed, audio_deltas=0, transcript_deltas=0)
        async with sim, connect(ws_url(sim)) as ws:
            for _ in range(20):
                await send(ws, create())
                await until(ws.recv, DONE)
            return [e.usage for e in sim.ledger]

    first, again, other = run(usages(7)), run(usages(7)), run(usages(8))
    assert first == again and first != other
    for usage in first:
        assert_consistent(usage)
    assert len({u["total_tokens"] for u in first}) > 10
    assert any(u["input_token_details"]["image_tokens"] for u in first + other)


def test_simulator_thread_for_synchronous_callers():
    with SimulatorThread(seed=5) as sim:
        with sync_connect(ws_url(sim)) as ws:
            assert json.loads(ws.recv())["type"] == "session.created"
            ws.send(json.dumps(create()))
            while (event := json.loads(ws.recv()))["type"] != DONE:
                pass
        assert sim.ledger[0].usage == event["response"]["usage"]
        with pytest.raises(OSError), SimulatorThread(port=sim.port):
            pass  # the port is taken: the error reaches the caller's thread
    with pytest.raises(OSError):
        sync_connect(ws_url(sim), open_timeout=2)


def test_main_serves_until_interrupted():
    with served_module("ai_gateway_tools.simulators.realtime") as url:
        with sync_connect(url.replace("http://", "ws://") + "/v1/realtime", open_timeout=2) as ws:
            assert json.loads(ws.recv(timeout=2))["session"]["model"] == "gpt-realtime-2025-08-28"
