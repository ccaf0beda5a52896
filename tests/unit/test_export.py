"""realtime.export: a session's bundle, its audio decoded from what mitmproxy kept."""

from __future__ import annotations

import base64
import json
import os
import wave
from pathlib import Path

import pytest
from mitmproxy.test import tflow

from ai_gateway.proxy.bundle import ALAW_PCM16, ULAW_PCM16, decode_g711

from .conftest import configured_gateway, relay

USAGE = {"input_tokens": 1200, "output_tokens": 30, "input_token_details": {"cached_tokens": 1000}}


@pytest.fixture
def gateway():
    options = {"gateway_conversations": "on", "gateway_websocket_history": "all", "gateway_strip_audio": False}
    with configured_gateway(**options) as addon:
        yield addon


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def frames(path: Path) -> tuple[int, bytes]:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth()) == (1, 2)
        return wav.getframerate(), wav.readframes(wav.getnframes())


def test_g711_decodes_as_the_standard_tables_say():
    assert [int.from_bytes(ULAW_PCM16[b], "little", signed=True) for b in (0x00, 0x7F, 0x80, 0xFF)] == [
        -32124,
        0,
        32124,
        0,
    ]
    assert [int.from_bytes(ALAW_PCM16[b], "little", signed=True) for b in (0x55, 0xD5, 0x2A, 0xAA)] == [
        -8,
        8,
        -32256,
        32256,
    ]
    assert decode_g711(b"\xff\x80", ULAW_PCM16) == b"\x00\x00" + (32124).to_bytes(2, "little")


def test_a_session_s_bundle_holds_its_turns_events_and_both_voices(gateway, tmp_path):
    spoken, answered = [os.urandom(4800) for _ in range(2)], [os.urandom(9600) for _ in range(2)]
    where = {"response_id": "resp_1", "item_id": "item_a", "output_index": 0, "content_index": 0}
    events = [
        (False, {"type": "session.created", "session": {"model": "gpt-realtime-2025-08-28"}}),
        *[(True, {"type": "input_audio_buffer.append", "audio": b64(a)}) for a in spoken],
        (True, {"type": "input_audio_buffer.commit"}),
        (False, {"type": "input_audio_buffer.committed", "item_id": "item_u"}),
        (False, {"type": "conversation.item.input_audio_transcription.completed", "item_id": "item_u",
                 "transcript": "Hi there"}),
        (True, {"type": "response.create"}),
        (False, {"type": "response.created", "response": {"id": "resp_1"}}),
        *[(False, {"type": "response.output_audio.delta", **where, "delta": b64(a)}) for a in answered],
        (False, {"type": "response.output_audio_transcript.delta", **where, "delta": "Hello"}),
        (False, {"type": "response.done", "response": {"id": "resp_1", "status": "completed", "usage": USAGE}}),
    ]  # fmt: skip
    flow = relay(gateway, events)
    gateway.session_export.export([flow, tflow.tflow()], str(tmp_path))
    bundle = tmp_path / flow.id
    assert sorted(p.name for p in bundle.iterdir()) == [
        "events.jsonl",
        "model.wav",
        "turns",
        "turns.json",
        "turns.md",
        "user.wav",
    ]
    assert frames(bundle / "user.wav") == (24_000, b"".join(spoken))
    assert frames(bundle / "model.wav") == (24_000, b"".join(answered))
    assert frames(bundle / "turns" / "001-user.wav") == (24_000, b"".join(spoken))
    assert frames(bundle / "turns" / "002-model.wav") == (24_000, b"".join(answered))
    lines = [json.loads(line) for line in (bundle / "events.jsonl").read_text().splitlines()]
    assert [line["event"]["type"] for line in lines] == [e["type"] for _, e in events]
    assert lines[1]["from"] == "client" and lines[1]["event"]["audio"].startswith("<audio pcm16 24 kHz: 4,800 bytes")
    assert all(b64(a) not in (bundle / "events.jsonl").read_text() for a in spoken + answered)
    turns = json.loads((bundle / "turns.json").read_text())["turns"]
    assert [(t["role"], t["text"], t["wav"]) for t in turns] == [
        ("user", "Hi there", "turns/001-user.wav"),
        ("assistant", "Hello", "turns/002-model.wav"),
    ]
    assert turns[1]["usage"] == {"input": 1200, "cached": 1000, "output": 30} and turns[1]["cost_usd"] > 0
    markdown = (bundle / "turns.md").read_text()
    assert "**user (voice)** `00:00.0`: Hi there" in markdown and "- *completed · 1,230 tokens" in markdown


def test_g711_sessions_are_decoded_at_8_khz_and_stripped_audio_makes_no_wav(gateway, tmp_path):
    ulaw, alaw = os.urandom(800), os.urandom(800)
    session = {"input_audio_format": "g711_ulaw", "output_audio_format": "g711_alaw"}
    events = [
        (False, {"type": "session.updated", "session": session}),
        (True, {"type": "input_audio_buffer.append", "audio": b64(ulaw)}),
        (False, {"type": "response.audio.delta", "response_id": "r", "delta": b64(alaw)}),
        (True, {"type": "input_audio_buffer.append", "audio": "<audio pcm16 24 kHz: 800 bytes, 16.7 ms>"}),
    ]
    flow = relay(gateway, events)
    gateway.session_export.export([flow], str(tmp_path))
    assert frames(tmp_path / flow.id / "user.wav") == (8_000, decode_g711(ulaw, ULAW_PCM16))
    assert frames(tmp_path / flow.id / "model.wav") == (8_000, decode_g711(alaw, ALAW_PCM16))
    flow.websocket.messages = flow.websocket.messages[-1:]  # only a placeholder is left
    gateway.session_export.export([flow], str(tmp_path / "stripped"))
    assert not list((tmp_path / "stripped" / flow.id).glob("*.wav"))
