"""Recordings read back for gateway_replay and scripts/replay: audio rebuilt exactly from a bundle,
server events cut into answers by their causes, and one clear line for what is not a recording."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import exceptions, io
from mitmproxy.test import taddons, tflow
from mitmproxy.websocket import WebSocketMessage

from ai_gateway.config.policy import DEFAULT_POLICY
from ai_gateway.proxy.addon import Gateway
from ai_gateway.proxy.recording import RecordingError, load
from ai_gateway.proxy.replay_server import AUDIO, OPEN, answers

from .conftest import configured_gateway
from .test_export import relay

SESSION = {"type": "session.created", "session": {"model": "gpt-realtime-2025-08-28"}}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bundle(tmp_path: Path, events: list[tuple[bool, dict[str, Any]]]) -> Path:
    """The bundle realtime.export writes of a session relayed with its audio kept."""
    options = {"gateway_conversations": "on", "gateway_websocket_history": "all", "gateway_strip_audio": False}
    with configured_gateway(**options) as gateway:
        flow = relay(gateway, events)
        gateway.session_export.export([flow], str(tmp_path))
    return tmp_path / flow.id


def sent_audio(path: Path) -> list[tuple[bool, str]]:
    recording = load(path)
    out = []
    for message in recording.messages:
        event = json.loads(recording.frame(message))
        audio = event.get("audio") or event.get("delta") if event["type"].endswith(("append", "audio.delta")) else None
        if audio is not None:
            out.append((message.from_client, audio))
    return out


@pytest.mark.parametrize(
    "formats",
    [{}, {"input_audio_format": "g711_ulaw", "output_audio_format": "g711_alaw"}],
    ids=["pcm16", "g711"],
)
def test_a_bundle_s_audio_is_cut_back_out_of_its_wavs_exactly(tmp_path, formats):
    # μ-law 0x7F and 0xFF both decode to 0: the WAV cannot tell them apart, 0xFF comes back.
    spoken = [os.urandom(n).replace(b"\x7f", b"\xff") for n in (480, 960)]
    answered = [os.urandom(n) for n in (1920, 640, 2)]
    events = [
        (False, SESSION),
        (False, {"type": "session.updated", "session": formats}),
        *[(True, {"type": "input_audio_buffer.append", "audio": b64(a)}) for a in spoken],
        (True, {"type": "response.create"}),
        *[(False, {"type": "response.audio.delta", "response_id": "r", "delta": b64(a)}) for a in answered],
    ]
    path = bundle(tmp_path, events)
    assert sent_audio(path) == [(True, b64(a)) for a in spoken] + [(False, b64(a)) for a in answered]
    assert load(path).notes == []


def test_audio_a_wav_cannot_give_exactly_is_silence_of_its_length(tmp_path):
    events = [(False, SESSION), (True, {"type": "input_audio_buffer.append", "audio": b64(os.urandom(480))})]
    path = bundle(tmp_path, events)
    (path / "user.wav").unlink()
    assert sent_audio(path) == [(True, b64(bytes(480)))]
    assert load(path).notes == ["user.wav holds 0 bytes of PCM16, the events 480: its audio is replayed as silence"]


def test_server_events_are_cut_into_answers_by_their_causes(tmp_path):
    """Under server VAD the user's audio is the cause: speech starts and stops once as much was
    appended as in the recording; a response's events stay with the answer that started it."""
    chunk = b64(bytes(4800))
    created = {"type": "response.created", "response": {"id": "r1"}}
    events = [
        (False, SESSION),
        (True, {"event_id": "e1", "type": "session.update", "session": {}}),
        (False, {"type": "session.updated", "session": {}}),
        (True, {"type": "input_audio_buffer.append", "audio": chunk}),
        (False, {"type": "input_audio_buffer.speech_started"}),
        (True, {"type": "input_audio_buffer.append", "audio": chunk}),
        (False, {"type": "input_audio_buffer.speech_stopped"}),
        (False, {"type": "input_audio_buffer.committed"}),
        (False, created),
        (True, {"type": "conversation.item.create", "item": {}}),
        (False, {"type": "response.output_audio_transcript.delta", "response_id": "r1", "delta": "Hi"}),
        (False, {"type": "conversation.item.added"}),
        (False, {"type": "response.done", "response": {"id": "r1", "status": "completed"}}),
    ]
    cut = answers(load(bundle(tmp_path, events)).messages)
    assert [(a.cause, a.threshold, [m.kind for m in a.messages]) for a in cut] == [
        (OPEN, 0, ["session.created"]),
        ("session.update", 0, ["session.updated"]),
        (AUDIO, 4800, ["input_audio_buffer.speech_started"]),
        (AUDIO, 9600, ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed", "response.created",
                       "response.output_audio_transcript.delta", "response.done"]),
        ("conversation.item.create", 0, ["conversation.item.added"]),
    ]  # fmt: skip


def flow_file(tmp_path: Path, *flows: Any) -> Path:
    path = tmp_path / "flows"
    with path.open("wb") as file:
        writer = io.FlowWriter(file)
        for flow in flows:
            writer.add(flow)
    return path


def websocket_flow(*events: tuple[bool, dict[str, Any]]) -> Any:
    flow = tflow.twebsocketflow()
    flow.request.path = "/v1/realtime?model=gpt-realtime-mini"
    flow.websocket.messages = [WebSocketMessage(1, c, json.dumps(e).encode()) for c, e in events]
    return flow


def test_a_flow_file_s_session_is_replayed_as_it_was_sent(tmp_path):
    audio = b64(os.urandom(960))
    delta = {"type": "response.output_audio.delta", "response_id": "r", "delta": audio}
    recording = load(flow_file(tmp_path, tflow.tflow(resp=True), websocket_flow((False, SESSION), (False, delta))))
    assert recording.request_model == "gpt-realtime-mini" and recording.model == "gpt-realtime-2025-08-28"
    assert [json.loads(recording.frame(m)) for m in recording.messages] == [SESSION, delta]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", r"missing: no such file or directory; expected a realtime.export bundle"),
        (lambda p: p, r": not a recording: no events.jsonl in it; expected a realtime.export bundle \(a directory"),
        (
            lambda p: write(p / "events.jsonl", json.dumps({"at": 1, "from": "server", "event": SESSION}) + '\n{"at"'),
            r"events.jsonl line 2: not a JSON object \(truncated\?\); expected one event a line",
        ),
        (lambda p: write(p / "events.jsonl", "\n"), r"events.jsonl: empty; expected one recorded event a line"),
        (
            lambda p: write(
                p / "events.jsonl", json.dumps({"at": 1, "from": "server", "event": {"setupComplete": {}}})
            ),
            r"events.jsonl: a Gemini Live session; expected an OpenAI Realtime one",
        ),
        (lambda p: write(p / "notes.txt", "hello\n"), r"notes.txt: not a readable flow file .*; expected a"),
        (lambda p: flow_file(p, tflow.tflow(resp=True)), r"flows: 1 flows, none a WebSocket session; expected"),
        (
            lambda p: flow_file(p, websocket_flow((False, {"type": "response.done", "response": {}}))),
            r"flows: the server's first event is 'response.done', not session.created; expected a whole OpenAI "
            r"Realtime session \(mitmdump keeps only the last message unless gateway_websocket_history=all\)",
        ),
    ],
    ids=["missing", "not-a-bundle", "truncated", "empty", "gemini-live", "not-a-flow-file", "no-session", "partial"],
)
def test_what_is_not_a_realtime_recording_is_one_line_naming_the_file(tmp_path, make, message):
    with pytest.raises(RecordingError, match=message) as refused:
        load(make(tmp_path))
    assert "\n" not in str(refused.value) and str(tmp_path) in str(refused.value)


def test_a_bad_recording_is_refused_while_running_and_the_previous_stays(tmp_path):
    good = bundle(tmp_path, [(False, SESSION)])
    gateway = Gateway()
    with taddons.context(gateway) as context:
        context.configure(gateway, gateway_metrics_port=0, gateway_policy=str(DEFAULT_POLICY), gateway_replay=str(good))
        gateway.state.is_running = True
        with pytest.raises(exceptions.OptionsError, match=r"^gateway_replay: \S*missing: no such file or directory"):
            context.configure(gateway, gateway_replay=str(tmp_path / "missing"))
        assert gateway.replay.recording is not None and gateway.replay.recording.source == good / "events.jsonl"
