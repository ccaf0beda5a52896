"""What the gateway keeps of a session: relayed audio within its caps, personal data redacted
(history, turns, exports, recordings) but never in what is relayed, and exports it refuses."""

from __future__ import annotations

import base64
import json
import os
import wave
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import ctx, exceptions
from mitmproxy.test import tflow
from mitmproxy.websocket import WebSocketMessage

from ai_gateway.accounting.redaction import Redactor
from ai_gateway.config.guardrails import RedactPolicy
from ai_gateway.proxy.addon import Gateway
from ai_gateway.proxy.contentview import _render_frame, render_conversation
from ai_gateway.proxy.conversation import replay
from ai_gateway.proxy.policy_file import read_policy
from ai_gateway.proxy.retention import AudioRetention, redact_message

from .conftest import configured_gateway, relay

EMAIL, CARD = "jo.doe@example.com", "4111 1111 1111 1111"
REDACTOR = Redactor(RedactPolicy(("email", "phone", "card", "iban")))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def audio_message(size: int) -> WebSocketMessage:
    event = {"type": "response.output_audio.delta", "response_id": "r", "delta": b64(os.urandom(size))}
    return WebSocketMessage(1, False, json.dumps(event).encode())


def kept_audio(messages: list[WebSocketMessage]) -> list[bool]:
    return [b"<audio " not in m.content for m in messages]


def test_audio_is_kept_within_the_session_cap_the_oldest_shrunk_first():
    retention = AudioRetention(session_bytes=3 * 6500, total_bytes=100 * 6500)
    messages = [audio_message(4800) for _ in range(5)]  # 6,4xx bytes each as base64 JSON
    for message in messages:
        retention.keep("a", message)
    assert kept_audio(messages) == [False, False, True, True, True]
    assert retention.total == sum(len(m.content) for m in messages[2:]) <= retention.session_cap


def test_the_total_cap_shrinks_the_oldest_audio_of_any_session():
    retention = AudioRetention(session_bytes=10 * 6500, total_bytes=3 * 6500)
    first, second = [audio_message(4800) for _ in range(3)], [audio_message(4800) for _ in range(3)]
    for message in first:
        retention.keep("a", message)
    for message in second:
        retention.keep("b", message)
    assert kept_audio(first) == [False, False, False]
    assert kept_audio(second) == [True, True, True]
    assert retention.total <= retention.total_cap and "a" not in retention.sessions


def test_many_shrunk_entries_do_not_pile_up():
    retention = AudioRetention(session_bytes=6500, total_bytes=10 * 6500)
    for _ in range(1000):
        retention.keep("a", audio_message(4800))
    assert len(retention.order) < 200 and retention.live == 1


def test_text_events_are_not_audio_to_keep():
    retention = AudioRetention(1, 1)
    message = WebSocketMessage(1, False, b'{"type":"response.output_text.delta","delta":"hi"}')
    retention.keep("a", message)
    assert retention.total == 0 and message.content.endswith(b'"hi"}')


@pytest.mark.parametrize(
    ("event", "path"),
    [
        ({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
          "content": [{"type": "input_text", "text": f"mail {EMAIL}"}]}}, ("item", "content", 0, "text")),
        ({"type": "conversation.item.input_audio_transcription.completed", "item_id": "i",
          "transcript": f"my card is {CARD}"}, ("transcript",)),
        ({"type": "response.output_audio_transcript.delta", "response_id": "r", "delta": f"write {EMAIL}"},
         ("delta",)),
        ({"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": "c",
          "output": json.dumps({"email": EMAIL})}}, ("item", "output")),
        ({"type": "response.done", "response": {"id": "r", "output": [{"type": "message", "content": [
          {"type": "output_audio", "transcript": f"call +44 20 7946 0958 or {EMAIL}"}]}]}},
         ("response", "output", 0, "content", 0, "transcript")),
    ],
)  # fmt: skip
def test_a_kept_event_s_strings_are_redacted_and_nothing_else(event: dict[str, Any], path: tuple[Any, ...]):
    message = WebSocketMessage(1, True, json.dumps(event).encode())
    redact_message(message, REDACTOR)
    kept = json.loads(message.content)
    value = kept
    for key in path:
        value = value[key]
    assert EMAIL not in value and CARD not in value and "[redacted:" in value
    assert kept["type"] == event["type"]
    assert {k for k in kept} == set(event)


def test_audio_events_and_clean_events_are_left_byte_for_byte():
    audio = audio_message(4800)
    clean = WebSocketMessage(1, True, b'{"type": "response.create"}')
    before = audio.content, clean.content
    for message in (audio, clean):
        redact_message(message, REDACTOR)
    assert (audio.content, clean.content) == before
    text = WebSocketMessage(1, True, f"not json {EMAIL}".encode())
    redact_message(text, REDACTOR)
    assert text.content == b"not json [redacted:email]"


@pytest.fixture
def redacting(tmp_path: Path):
    policy = tmp_path / "p.yaml"
    policy.write_text("redact:\n  builtin: [email, card]\nroutes:\n  /realtime: Realtime\n")
    options = {"gateway_conversations": "on", "gateway_websocket_history": "all", "gateway_strip_audio": False}
    with configured_gateway(**options) as gateway:
        gateway.policy_file.apply(*_read(policy))
        yield gateway


def _read(path: Path):
    return read_policy(str(path), 1 << 20)


SPOKEN = os.urandom(4800)
SESSION = [
    (True, {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": EMAIL}]}}),
    (True, {"type": "input_audio_buffer.append", "audio": b64(SPOKEN)}),
    (True, {"type": "input_audio_buffer.commit"}),
    (False, {"type": "input_audio_buffer.committed", "item_id": "item_u"}),
    (False, {"type": "conversation.item.input_audio_transcription.completed", "item_id": "item_u",
             "transcript": f"card {CARD}"}),
    (True, {"type": "response.create"}),
    (False, {"type": "response.output_audio_transcript.delta", "response_id": "r1", "delta": f"noted {EMAIL}"}),
    (False, {"type": "response.done", "response": {"id": "r1", "status": "completed"}}),
]  # fmt: skip


def test_what_is_kept_is_redacted_what_is_relayed_is_not(redacting: Gateway, tmp_path: Path):
    relayed: list[bytes] = []
    flow = relay(redacting, SESSION, relayed)
    carried = [EMAIL.encode() in r or CARD.encode() in r for r in relayed]
    assert carried == [True, False, False, False, True, False, True, False]
    kept = b"".join(m.content for m in flow.websocket.messages)
    assert EMAIL.encode() not in kept and CARD.encode() not in kept and b"[redacted:email]" in kept
    assert base64.b64decode(json.loads(flow.websocket.messages[1].content)["audio"]) == SPOKEN
    conversation = redacting.state.conversations.get(flow.id)
    shown = render_conversation(conversation, True, redacting.state.redactor)
    assert EMAIL not in shown and CARD not in shown and "[redacted:card]" in shown
    assert EMAIL not in render_conversation(replay(flow))
    unredacted = json.dumps(SESSION[0][1]).encode()  # the message being relayed, shown before it is redacted
    assert EMAIL not in _render_frame(unredacted, None, redacting.state.redactor)
    redacting.session_export.export([flow], str(tmp_path / "export"))
    bundle = tmp_path / "export" / flow.id
    for name in ("events.jsonl", "turns.json", "turns.md"):
        text = (bundle / name).read_text()
        assert EMAIL not in text and CARD not in text and "[redacted:" in text, name
    with wave.open(str(bundle / "turns" / "002-user.wav")) as wav:  # the text item (001) has no audio
        assert wav.readframes(wav.getnframes()) == SPOKEN


def test_a_recording_is_written_as_the_session_closes_redacted(tmp_path: Path):
    policy = tmp_path / "p.yaml"
    policy.write_text("redact:\n  builtin: [email, card]\nroutes:\n  /realtime: Realtime\n")
    with configured_gateway(gateway_record=str(tmp_path / "rec")) as gateway:
        gateway.policy_file.apply(*_read(policy))
        flow = relay(gateway, SESSION)
    bundle = tmp_path / "rec" / flow.id
    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == [flow.id]
    lines = [json.loads(line) for line in (bundle / "events.jsonl").read_text().splitlines()]
    assert [line["event"]["type"] for line in lines] == [e["type"] for _, e in SESSION]
    turns = json.loads((bundle / "turns.json").read_text())["turns"]
    assert [(t["role"], t["text"]) for t in turns] == [
        ("user", "[redacted:email]"),
        ("user", "card [redacted:card]"),
        ("assistant", "noted [redacted:email]"),
    ]
    with wave.open(str(bundle / turns[1]["wav"])) as wav:
        assert wav.readframes(wav.getnframes()) == SPOKEN


def test_export_refuses_what_it_cannot_write(tmp_path: Path):
    with configured_gateway(gateway_websocket_history="all") as gateway:
        http_only = tflow.tflow()
        other_socket = tflow.twebsocketflow()
        other_socket.request.path = "/v1/responses"
        with pytest.raises(
            exceptions.CommandError, match="none of the 2 flows is a Realtime, Gemini Live or GPT-Live session"
        ):
            gateway.session_export.export([http_only, other_socket], str(tmp_path))
        flow = relay(gateway, SESSION[:2])
        (tmp_path / flow.id).mkdir()
        (tmp_path / flow.id / "mine.txt").write_text("kept")
        with pytest.raises(exceptions.CommandError, match=f"not overwriting .*{flow.id}: not empty"):
            gateway.session_export.export([flow], str(tmp_path))
        assert [p.name for p in (tmp_path / flow.id).iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("option", ["gateway_audio_session_mb", "gateway_audio_total_mb"])
def test_negative_caps_are_refused(option: str):
    with configured_gateway() as gateway:
        gateway.state.is_running = True
        with pytest.raises(exceptions.OptionsError, match=f"{option}: expected a size in MB"):
            ctx.options.update(**{option: -1})


AUDIO_SESSION = [
    (True, {"type": "input_audio_buffer.append", "audio": b64(SPOKEN)}),
    (False, {"type": "response.output_audio.delta", "response_id": "r1", "delta": b64(SPOKEN)}),
    (False, {"type": "response.done", "response": {"id": "r1", "status": "completed"}}),
]


@pytest.mark.parametrize(
    ("options", "kept"),
    [
        ({"gateway_websocket_history": "all"}, [True, True, False]),  # the whole history: audio kept within caps
        ({"gateway_websocket_history": "all", "gateway_audio_session_mb": 0}, [False, False, False]),
        ({"gateway_websocket_history": "3"}, [False, False, False]),  # a trimmed history: shrunk as before
    ],
)
def test_relayed_audio_is_kept_only_where_the_whole_history_is(options: dict[str, Any], kept: list[bool]):
    with configured_gateway(**options) as gateway:
        flow = relay(gateway, AUDIO_SESSION)
    assert [base64.b64encode(SPOKEN) in m.content for m in flow.websocket.messages] == kept
