"""Guardrails on OpenAI Realtime sessions, end to end on both launchers: a real websockets client,
the gateway, the simulated upstream (which records every client event it received).

A denied phrase in the user's text never reaches the upstream; in the model's spoken answer it
stops the response within its sentence (cancelled upstream, its item deleted, the rest dropped);
in the user's transcribed speech it cancels the answer; the counters say what happened.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
import websockets
from openai import APIError, BadRequestError, OpenAI

from ai_gateway_tools.harness import GatewayProcess, scrape, select
from ai_gateway_tools.simulators.guard import GuardSimulator
from ai_gateway_tools.simulators.http import HttpSimulator
from ai_gateway_tools.simulators.otlp import OtlpReceiver
from ai_gateway_tools.simulators.realtime import PCM16_BYTES_PER_SECOND, SimulatorThread

from ..clients import wait_until, websocket_base
from .test_frame_relay import CHOSEN, SOCKETS_CHOSEN
from .test_observability import FAST_EXPORT, json_lines

LAUNCHERS = ["mitmdump", "serve"]
# Guards run on the path gateway_relay=auto takes (sockets) on both launchers; an input block, an
# output block and a max_blocks close also on mitmproxy's WebSocket layer (messages), once.
RELAYS = [("mitmdump", "auto"), ("serve", "auto"), ("serve", "messages")]
CHOSEN_BY = {"auto": SOCKETS_CHOSEN, "frames": CHOSEN}
GUARD = "no-project-names"
POLICY = f"""
guardrails:
  - name: {GUARD}
    kind: regex
    deny: ["project\\\\s+falcon"]
    allow: ["project falcon is public"]
    phases: [input, output]
    action: block
routes:
  /realtime: Realtime
"""
DENIED_ANSWER = (
    "Sure. The project falcon launch is next week and it is secret. It will ship in May. Anything else I can help with?"
)
CHECKS = "agentgateway_guardrail_checks_total"


def policy(tmp_path: Path) -> str:
    path = tmp_path / "guardrails.yaml"
    path.write_text(POLICY)
    return str(path)


def relay_options(tmp_path: Path, relay: str) -> dict[str, str]:
    """The guarded policy on `relay`, debug logging naming the path each session took."""
    return {"gateway_policy": policy(tmp_path), "gateway_relay": relay, "termlog_verbosity": "debug"}


def assert_relayed_on(gateway: GatewayProcess, relay: str) -> None:
    """auto: the session went over its sockets (a guarded route is no longer kept on messages)."""
    assert (SOCKETS_CHOSEN in gateway.log()) == (relay == "auto")


def checks(gateway: GatewayProcess, phase: str, action: str) -> float:
    samples = select(scrape(gateway.metrics_url), guard=GUARD, phase=phase, action=action)
    return sum(v for (name, _), v in samples.items() if name == CHECKS)


def user_item(text: str, event_id: str) -> dict[str, Any]:
    content = [{"type": "input_text", "text": text}]
    return {"type": "conversation.item.create", "event_id": event_id, "item": {"type": "message", "role": "user", "content": content}}  # fmt: skip


async def read_until(ws: websockets.ClientConnection, kind: str) -> list[dict[str, Any]]:
    """Events the client receives up to and including the first of type `kind`."""
    events = []
    while True:
        events.append(json.loads(await asyncio.wait_for(ws.recv(), timeout=20)))
        if events[-1]["type"] == kind:
            return events


@pytest.fixture(scope="module")
def upstream():
    with SimulatorThread(seed=24) as simulator:
        yield simulator


@pytest.mark.parametrize(("launcher", "relay"), RELAYS)
def test_denied_user_text_never_reaches_the_upstream(tmp_path, upstream, launcher, relay):
    launcher_id = f"{launcher}-{relay}"
    with GatewayProcess(upstream.url, launcher=launcher, options=relay_options(tmp_path, relay)) as gateway:

        async def session() -> list[dict[str, Any]]:
            async with websockets.connect(f"{websocket_base(gateway.url)}/v1/realtime?model=gpt-realtime") as ws:
                await read_until(ws, "session.created")
                errors = []
                # Plain, full-width with a zero-width space, and upper case: all the same phrase.
                for i, text in enumerate(
                    ["Tell me about Project  Falcon", "ｐｒｏｊｅｃｔ fal\u200bcon?", "PROJECT FALCON"]
                ):
                    await ws.send(json.dumps(user_item(text, f"{launcher_id}-denied-{i}")))
                    errors.append((await read_until(ws, "error"))[-1])
                await ws.send(json.dumps(user_item("project falcon is public now", f"{launcher_id}-allowed")))
                await ws.send(json.dumps(user_item("What's the weather?", f"{launcher_id}-clean")))
                wait_until(lambda: any(e.get("event_id") == f"{launcher_id}-clean" for e in upstream.received))
                return errors

        errors = asyncio.run(session())
        assert [e["error"]["code"] for e in errors] == ["guardrail_blocked"] * 3
        assert all(GUARD in e["error"]["message"] for e in errors)
        assert [e["error"]["event_id"] for e in errors] == [f"{launcher_id}-denied-{i}" for i in range(3)]
        received = {e.get("event_id") for e in upstream.received}
        assert {f"{launcher_id}-allowed", f"{launcher_id}-clean"} <= received
        assert not any(f"{launcher_id}-denied" in str(event_id) for event_id in received)
        assert checks(gateway, "input", "block") == 3
        assert checks(gateway, "input", "allow") == 2
        assert_relayed_on(gateway, relay)


@pytest.mark.parametrize(("launcher", "relay"), RELAYS)
def test_a_denied_phrase_in_the_spoken_answer_stops_the_response_within_its_sentence(
    tmp_path, upstream, launcher, relay, capsys
):
    with GatewayProcess(upstream.url, launcher=launcher, options=relay_options(tmp_path, relay)) as gateway:

        async def session() -> list[dict[str, Any]]:
            async with websockets.connect(f"{websocket_base(gateway.url)}/v1/realtime?model=gpt-realtime") as ws:
                await read_until(ws, "session.created")
                metadata = {"sim_transcript": DENIED_ANSWER, "sim_delta_ms": "20"}
                await ws.send(json.dumps({"type": "response.create", "response": {"metadata": metadata}}))
                return await read_until(ws, "response.done")

        events = asyncio.run(session())
        said = "".join(e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta")
        audio = [e for e in events if e["type"] == "response.output_audio.delta"]
        errors = [e for e in events if e["type"] == "error"]
        done = events[-1]
        # Everything before the sentence's last word reached the client; nothing from the next sentence on.
        assert said == "Sure. The project falcon launch is next week and it is"
        assert [e["error"]["code"] for e in errors] == ["guardrail_blocked"]
        assert done["response"]["status"] == "cancelled" and done["response"]["output"] == []
        response_id = done["response"]["id"]
        cancels = [e for e in upstream.received if e["type"] == "response.cancel" and e["response_id"] == response_id]
        assert len(cancels) == 1
        deleted = {e["item_id"] for e in upstream.received if e["type"] == "conversation.item.delete"}
        assert {e["item_id"] for e in events if e["type"].endswith(".delta")} <= deleted
        assert checks(gateway, "output", "block") == 1
        assert_relayed_on(gateway, relay)
        samples = scrape(gateway.metrics_url)
        audio_seconds = sum(
            v
            for (name, labels), v in samples.items()
            if name == "agentgateway_guardrail_audio_before_block_seconds_sum" and ("guard", GUARD) in labels
        )
        audio_bytes = sum(len(base64.b64decode(e["delta"])) for e in audio)
        assert audio_seconds == pytest.approx(audio_bytes / PCM16_BYTES_PER_SECOND, rel=0.01)
        with capsys.disabled():
            print(
                f"\n{launcher} ({relay}): blocked after {len(said.split())} words, {audio_seconds * 1000:.0f} ms of audio passed"
            )


def test_output_no_sentence_end_closed_is_checked_when_the_response_is_done(tmp_path, upstream):
    """The simulator, as some upstreams, sends no transcript .done: the last window is checked at
    response.done, which then reaches the client without output, its item deleted upstream."""
    with GatewayProcess(upstream.url, options={"gateway_policy": policy(tmp_path)}) as gateway:

        async def session() -> list[dict[str, Any]]:
            async with websockets.connect(f"{websocket_base(gateway.url)}/v1/realtime?model=gpt-realtime") as ws:
                await read_until(ws, "session.created")
                metadata = {"sim_transcript": "ask me about project falcon"}
                await ws.send(json.dumps({"type": "response.create", "response": {"metadata": metadata}}))
                events = await read_until(ws, "response.done")
                if not any(e["type"] == "error" for e in events):  # the block is decided on response.done
                    events += await read_until(ws, "error")
                return events

        events = asyncio.run(session())
        done = next(e for e in events if e["type"] == "response.done")
        assert done["response"]["output"] == []
        assert [e["error"]["code"] for e in events if e["type"] == "error"] == ["guardrail_blocked"]
        item = next(e["item_id"] for e in events if e["type"].endswith("transcript.delta"))
        wait_until(
            lambda: any(e.get("item_id") == item for e in upstream.received if e["type"] == "conversation.item.delete")
        )
        assert checks(gateway, "output", "block") == 1


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_block_is_in_the_access_log_and_the_traces(tmp_path, upstream, launcher):
    """The blocked response's line and span, and its session's, name the guard, phase and action."""
    with (
        OtlpReceiver() as receiver,
        GatewayProcess(
            upstream.url,
            launcher=launcher,
            options={
                "gateway_policy": policy(tmp_path),
                "gateway_access_log": "json",
                "gateway_otlp_endpoint": receiver.url,
            },
            env=FAST_EXPORT,
        ) as gateway,
    ):
        model = f"gpt-realtime-guarded-{launcher}"

        async def session() -> str:
            async with websockets.connect(f"{websocket_base(gateway.url)}/v1/realtime?model={model}") as ws:
                await read_until(ws, "session.created")
                metadata = {"sim_transcript": DENIED_ANSWER}
                await ws.send(json.dumps({"type": "response.create", "response": {"metadata": metadata}}))
                return (await read_until(ws, "response.done"))[-1]["response"]["id"]

        response_id = asyncio.run(session())
        blocked = {"guardrail": GUARD, "guardrail_phase": "output", "guardrail_action": "block"}

        def lines() -> dict[str, dict[str, Any]]:
            return {line["event"]: line for line in json_lines(gateway.log()) if line.get("request_model") == model}

        logged = wait_until(lambda: (found := lines()).keys() >= {"response", "session"} and found)
        assert logged["response"]["response_id"] == response_id
        assert all(logged[event].items() >= blocked.items() for event in ("response", "session"))

        def guarded_spans() -> list[Any]:
            return [s for s in receiver.spans if model in s.name and "ai_gateway.guardrail.name" in s.attributes]

        spans = wait_until(lambda: len(guarded_spans()) == 2 and guarded_spans())  # the response's and the session's
        traced = {k.rsplit(".", 1)[-1]: v for s in spans for k, v in s.attributes.items() if "guardrail" in k}
        assert traced == {"name": GUARD, "phase": "output", "action": "block"}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_denied_transcribed_speech_cancels_the_answer_and_deletes_the_turn(tmp_path, launcher):
    spoken = "so what is the status of project falcon"
    chunk = base64.b64encode(bytes(PCM16_BYTES_PER_SECOND // 10)).decode()
    with (
        SimulatorThread(seed=25, user_transcript=spoken, vad_response_delay=0.05, delta_interval=0.02) as upstream,
        GatewayProcess(
            upstream.url, launcher=launcher, options={"gateway_policy": policy(tmp_path), "gateway_access_log": "json"}
        ) as gateway,
    ):

        async def session() -> list[dict[str, Any]]:
            async with websockets.connect(f"{websocket_base(gateway.url)}/v1/realtime?model=gpt-realtime") as ws:
                await read_until(ws, "session.created")
                audio_input = {
                    "turn_detection": {"type": "server_vad"},
                    "transcription": {"model": "gpt-4o-transcribe"},
                }
                session_update = {"type": "realtime", "audio": {"input": audio_input}}
                await ws.send(json.dumps({"type": "session.update", "session": session_update}))
                for _ in range(5):
                    await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
                return await read_until(ws, "response.done")

        events = asyncio.run(session())
        kinds = [e["type"] for e in events]
        assert "conversation.item.input_audio_transcription.completed" not in kinds
        assert [e["error"]["code"] for e in events if e["type"] == "error"] == ["guardrail_blocked"]
        assert events[-1]["response"]["status"] == "cancelled"
        assert not any(k.endswith(".delta") for k in kinds)
        stopped = next(e for e in events if e["type"] == "input_audio_buffer.speech_stopped")
        sent = [e["type"] for e in upstream.received]
        assert "response.cancel" in sent
        assert any(
            e.get("item_id") == stopped["item_id"] for e in upstream.received if e["type"] == "conversation.item.delete"
        )
        assert checks(gateway, "input", "block") == 1
        # The cancelled answer's record says why, as a blocked response's does (access log, traces).
        cancelled = events[-1]["response"]["id"]

        def logged() -> dict[str, Any] | None:
            lines = json_lines(gateway.log())
            return next((e for e in lines if e["event"] == "response" and e.get("response_id") == cancelled), None)

        line = wait_until(logged)
        assert line.items() >= {"guardrail": GUARD, "guardrail_phase": "input", "guardrail_action": "block"}.items()


@pytest.mark.parametrize(("launcher", "relay"), RELAYS)
def test_a_session_blocked_more_than_max_blocks_times_is_closed_with_1008(tmp_path, upstream, launcher, relay):
    path = tmp_path / "max_blocks.yaml"
    path.write_text(POLICY.replace("    action: block\n", "    action: block\n    max_blocks: 1\n"))
    options = {**relay_options(tmp_path, relay), "gateway_policy": str(path)}
    with GatewayProcess(upstream.url, launcher=launcher, options=options) as gateway:

        async def session() -> tuple[list[dict[str, Any]], websockets.ConnectionClosed]:
            async with websockets.connect(f"{websocket_base(gateway.url)}/v1/realtime?model=gpt-realtime") as ws:
                await read_until(ws, "session.created")
                await ws.send(json.dumps(user_item("project falcon?", f"{launcher}-{relay}-first")))
                errors = [(await read_until(ws, "error"))[-1]]
                await ws.send(json.dumps(user_item("project falcon!", f"{launcher}-{relay}-second")))
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    while True:
                        errors += [e for e in await read_until(ws, "error") if e["type"] == "error"]
                return errors, closed.value

        errors, closed = asyncio.run(session())
        assert [e["error"]["event_id"] for e in errors] == [f"{launcher}-{relay}-first", f"{launcher}-{relay}-second"]
        assert closed.rcvd is not None and closed.rcvd.code == 1008
        assert closed.rcvd.reason == f"guardrail '{GUARD}' blocked this session 2 times"
        assert checks(gateway, "input", "block") == 2
        assert_relayed_on(gateway, relay)


def service_policy(tmp_path: Path, guard_url: str, on_error: str = "open", timeout_ms: int = 300) -> str:
    path = tmp_path / "services.yaml"
    path.write_text(
        f"""
guardrails:
  - name: hook
    kind: webhook
    url: {guard_url}/webhook
    phases: [input]
    timeout_ms: {timeout_ms}
    on_error: {on_error}
  - name: moderation
    kind: moderation
    url: {guard_url}/v1/moderations
    phases: [output]
    timeout_ms: {timeout_ms}
    on_error: {on_error}
    thresholds: {{violence: 0.5}}
{ROUTES_YAML}"""
    )
    return str(path)


ROUTES_YAML = "routes:\n  /realtime: Realtime\n"


def service_checks(gateway: GatewayProcess, guard: str, action: str) -> float:
    samples = select(scrape(gateway.metrics_url), guard=guard, action=action)
    return sum(v for (name, _), v in samples.items() if name == CHECKS)


async def say(ws: websockets.ClientConnection, text: str, event_id: str) -> None:
    await ws.send(json.dumps(user_item(text, event_id)))


def test_webhook_and_moderation_verdicts_block_input_and_output(tmp_path, upstream):
    with (
        GuardSimulator() as guard,
        GatewayProcess(upstream.url, options={"gateway_policy": service_policy(tmp_path, guard.url)}) as gateway,
    ):

        async def session() -> tuple[dict[str, Any], list[dict[str, Any]]]:
            async with websockets.connect(f"{websocket_base(gateway.url)}/v1/realtime?model=gpt-realtime") as ws:
                await read_until(ws, "session.created")
                await say(ws, "What about Project Falcon?", "hook-denied")
                refused = (await read_until(ws, "error"))[-1]
                await say(ws, "What's the weather?", "hook-clean")
                metadata = {"sim_transcript": DENIED_ANSWER + " " + DENIED_ANSWER, "sim_delta_ms": "20"}
                await ws.send(json.dumps({"type": "response.create", "response": {"metadata": metadata}}))
                return refused, await read_until(ws, "response.done")

        refused, events = asyncio.run(session())
        assert refused["error"]["code"] == "guardrail_blocked" and "'hook'" in refused["error"]["message"]
        received = {e.get("event_id") for e in upstream.received}
        assert "hook-clean" in received and "hook-denied" not in received
        said = "".join(e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta")
        assert "'moderation'" in next(e for e in events if e["type"] == "error")["error"]["message"]
        assert events[-1]["response"]["status"] == "cancelled" and len(said) < len(DENIED_ANSWER) * 2
        assert service_checks(gateway, "hook", "block") == 1 and service_checks(gateway, "moderation", "block") >= 1
        assert [path for path, _ in guard.requests].count("/webhook") == 2


@pytest.mark.parametrize(("launcher", "relay"), [("serve", "auto"), ("mitmdump", "frames")])
def test_user_text_held_for_a_verdict_holds_what_the_client_sends_after_it(tmp_path, upstream, launcher, relay):
    """On the byte paths a user item waiting for the webhook holds its direction: the response.create
    sent right behind it reaches the upstream after the item (let through) or its verdict (blocked)."""
    with (
        GuardSimulator(delay=0.5) as guard,
        GatewayProcess(
            upstream.url,
            launcher=launcher,
            options={
                "gateway_policy": service_policy(tmp_path, guard.url, timeout_ms=5000),
                "gateway_relay": relay,
                "termlog_verbosity": "debug",
            },
        ) as gateway,
    ):
        ids = {name: f"held-{launcher}-{relay}-{name}" for name in ("clean", "after-clean", "denied", "after-denied")}

        async def session() -> list[dict[str, Any]]:
            async with websockets.connect(f"{websocket_base(gateway.url)}/v1/realtime?model=gpt-realtime") as ws:
                await read_until(ws, "session.created")
                events = []
                for item, text in (("clean", "What's the weather?"), ("denied", "What about Project Falcon?")):
                    await say(ws, text, ids[item])
                    await ws.send(json.dumps({"type": "response.create", "event_id": ids[f"after-{item}"]}))
                    events += await read_until(ws, "response.done")
                return events

        (refused,) = [e for e in asyncio.run(session()) if e["type"] == "error"]
        received = [e.get("event_id") for e in upstream.received]
        assert received.index(ids["clean"]) < received.index(ids["after-clean"])
        assert ids["denied"] not in received and ids["after-denied"] in received
        assert refused["error"]["event_id"] == ids["denied"]
        assert service_checks(gateway, "hook", "block") == 1
        assert CHOSEN_BY[relay] in gateway.log()


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("on_error", ["open", "closed"])
def test_a_dead_guard_service_neither_stalls_nor_breaks_a_session(tmp_path, upstream, launcher, on_error, capsys):
    """The service answers after 5 s, the guards wait 300 ms: user text is let through (open) or
    blocked (closed) within the timeout, and a response streams at full speed meanwhile."""
    with (
        GuardSimulator(delay=5.0) as guard,
        GatewayProcess(
            upstream.url, launcher=launcher, options={"gateway_policy": service_policy(tmp_path, guard.url, on_error)}
        ) as gateway,
    ):

        async def session() -> tuple[float, list[dict[str, Any]], float]:
            async with websockets.connect(f"{websocket_base(gateway.url)}/v1/realtime?model=gpt-realtime") as ws:
                await read_until(ws, "session.created")
                began = time.monotonic()
                await say(ws, "What's the weather?", f"dead-{launcher}-{on_error}")
                await ws.send(
                    json.dumps({"type": "response.create", "response": {"metadata": {"sim_transcript": DENIED_ANSWER}}})
                )
                events = await read_until(ws, "response.done")
                held = time.monotonic() - began
                streamed = events[-1]
                return held, events, streamed["response"]["status"] == "completed"

        held, events, completed = asyncio.run(session())
        errors = [e for e in events if e["type"] == "error"]
        passed = f"dead-{launcher}-{on_error}" in {e.get("event_id") for e in upstream.received}
        with capsys.disabled():
            print(f"\n{launcher}, on_error {on_error}: item and response done in {held * 1000:.0f} ms")
        assert held < 1.5  # the item waited at most the 300 ms timeout, the response none
        assert passed == (on_error == "open")
        assert len(errors) == (1 if on_error == "closed" else 0)
        assert completed  # output checks were asked off the relay: the answer streamed on whole
        assert service_checks(gateway, "hook", "error") == 1


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_guard_service_that_keeps_timing_out_is_paused_and_no_user_item_waits_for_it(tmp_path, upstream, launcher):
    """Three user items each wait out the 300 ms timeout of a service that answers after 5 s; the
    service is then paused: the next items pass at once (on_error open), no request is sent for
    them, and the gateway says so once."""
    with (
        GuardSimulator(delay=5.0) as guard,
        GatewayProcess(upstream.url, launcher=launcher, options={"gateway_policy": service_policy(tmp_path, guard.url)}) as gateway,
    ):  # fmt: skip

        async def session() -> list[float]:
            async with websockets.connect(f"{websocket_base(gateway.url)}/v1/realtime?model=gpt-realtime") as ws:
                await read_until(ws, "session.created")
                waited = []
                for n in range(5):
                    began = time.monotonic()
                    await say(ws, f"item {n}", f"paused-{launcher}-{n}")
                    await read_until(ws, "conversation.item.done")
                    waited.append(time.monotonic() - began)
                return waited

        waited = asyncio.run(session())
        print(f"\n{launcher}: each item acknowledged after " + ", ".join(f"{w * 1000:.0f} ms" for w in waited))
        assert all(w >= 0.3 for w in waited[:3]) and all(w < 0.2 for w in waited[3:])
        assert [path for path, _ in guard.requests].count("/webhook") == 3
        assert service_checks(gateway, "hook", "error") == 5
        assert (
            gateway.log().count("'hook': its service failed 3 calls in a row (the last: timeout); not asked for 1 s")
            == 1
        )


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_http_requests_and_responses_are_guarded(tmp_path, launcher):
    path = tmp_path / "http.yaml"
    path.write_text(POLICY + "  /chat/completions: Completions\n  /responses: Responses\n")
    denied = {"x-sim-text": "Sure. The project falcon launch is next week. It ships in May."}
    with (
        SimulatorThread(server=HttpSimulator(seed=26)) as upstream,
        GatewayProcess(upstream.url, launcher=launcher, options={"gateway_policy": str(path)}) as gateway,
    ):
        client = OpenAI(api_key="sk-http", base_url=f"{gateway.url}/v1", max_retries=0)
        ask = [{"role": "user", "content": "Any news on PROJECT FALCON?"}]
        with pytest.raises(BadRequestError) as refused:
            client.chat.completions.create(model="gpt-4o-mini", messages=ask)
        assert refused.value.code == "guardrail_blocked" and not upstream.requests
        hello = [{"role": "user", "content": "hello"}]
        with pytest.raises(BadRequestError) as replaced:
            client.chat.completions.create(model="gpt-4o-mini", messages=hello, extra_headers=denied)
        assert replaced.value.code == "guardrail_blocked" and len(upstream.requests) == 1
        said = []
        with pytest.raises(APIError, match="guardrail"):
            for chunk in client.chat.completions.create(model="gpt-4o-mini", messages=hello, stream=True, extra_headers=denied):  # fmt: skip
                said.extend(c.delta.content or "" for c in chunk.choices)
        assert "".join(said) == "Sure. The project falcon launch is next"  # up to the sentence's last word
        events = list(client.responses.create(model="gpt-4o-mini", input="hello", stream=True, extra_headers=denied))
        assert events[-1].type == "error" and events[-1].code == "guardrail_blocked"
        assert client.chat.completions.create(model="gpt-4o-mini", messages=hello).choices[0].message.content
        assert checks(gateway, "input", "block") == 1 and checks(gateway, "output", "block") == 3
