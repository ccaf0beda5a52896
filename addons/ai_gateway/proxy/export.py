"""`realtime.export`: a Realtime session written out as a bundle a person can read and hear.

Callable from mitmweb's command bar (`realtime.export @focus ~/sessions`) and from mitmdump
scripts. For each selected Realtime flow it writes a directory named after the flow:
`turns.md` and `turns.json` (the conversation, with the meters' cost and timing when the
session was recorded live), `events.jsonl` (every kept message, audio replaced by its size),
and `user.wav` and `model.wav` (the user's and the model's audio as kept, decoded to PCM16 in
the session's negotiated format: pcm16 at its rate, G.711 μ-law or A-law at 8 kHz). Audio is
only there to export when mitmproxy kept it: with `gateway_strip_audio` off (by default a relayed
frame's audio is replaced by its size), and for the messages `gateway_websocket_history` keeps.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import wave
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from mitmproxy import command, flow, http, types

from ai_gateway.accounting.items import Malformed
from ai_gateway.config.policy import WireProtocol
from ai_gateway.protocols.gemini_live import INPUT_RATE, OUTPUT_RATE, audio_rate, audio_slots, describe_audio
from ai_gateway.protocols.json_events import decode_json
from ai_gateway.protocols.realtime_conversation import ASSISTANT, Conversation, Turn
from ai_gateway.proxy.contentview import clock, said, speaker, turn_summary
from ai_gateway.proxy.conversation import Conversations, kind_of, replay
from ai_gateway.proxy.history import AUDIO_FIELDS, PLACEHOLDER_PREFIX, replace_audio

logger = logging.getLogger(__name__)

PCM16_RATE = 24_000  # the Realtime API's default
G711_RATE = 8_000
# Formats as GA (`audio.input.format.type`) and beta (`input_audio_format`) sessions name them.
G711_ULAW = frozenset({"audio/pcmu", "g711_ulaw"})
G711_ALAW = frozenset({"audio/pcma", "g711_alaw"})
SPEAKERS = {True: "user", False: "model"}  # from_client -> whose audio
URLSAFE_BASE64 = str.maketrans("-_", "+/")


def _ulaw(byte: int) -> int:
    byte = ~byte & 0xFF
    magnitude = ((((byte & 0x0F) << 3) + 0x84) << ((byte >> 4) & 7)) - 0x84
    return -magnitude if byte & 0x80 else magnitude


def _alaw(byte: int) -> int:
    byte ^= 0x55
    exponent, mantissa = (byte >> 4) & 7, byte & 0x0F
    magnitude = (mantissa << 4) + 8 if exponent == 0 else ((mantissa << 4) + 0x108) << (exponent - 1)
    return magnitude if byte & 0x80 else -magnitude


# Each G.711 byte's PCM16 sample, little-endian (audioop, which did this, left Python in 3.13).
ULAW_PCM16 = [_ulaw(b).to_bytes(2, "little", signed=True) for b in range(256)]
ALAW_PCM16 = [_alaw(b).to_bytes(2, "little", signed=True) for b in range(256)]


def decode_g711(data: bytes, table: list[bytes]) -> bytes:
    return b"".join(table[b] for b in data)


class AudioFormat:
    """The audio format in force for one direction, as the session's events set it."""

    def __init__(self) -> None:
        self.kind = "pcm16"
        self.rate = PCM16_RATE

    def update(self, format_field: Any) -> None:
        """`format_field`: GA's `{"type": "audio/pcm", "rate": 24000}` or beta's `"pcm16"`."""
        kind = format_field.get("type") if isinstance(format_field, dict) else format_field
        if not isinstance(kind, str):
            return
        self.kind = kind
        rate = format_field.get("rate") if isinstance(format_field, dict) else None
        self.rate = G711_RATE if self.is_g711 else rate if isinstance(rate, int) and rate > 0 else PCM16_RATE

    @property
    def is_g711(self) -> bool:
        return self.kind in G711_ULAW or self.kind in G711_ALAW

    def pcm16(self, audio: bytes) -> bytes:
        if self.kind in G711_ULAW:
            return decode_g711(audio, ULAW_PCM16)
        if self.kind in G711_ALAW:
            return decode_g711(audio, ALAW_PCM16)
        return audio


class WavTrack:
    """One speaker's audio, appended chunk by chunk to a mono PCM16 WAV opened at its first chunk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: wave.Wave_write | None = None
        self.rate = 0
        self.bytes = 0

    def add(self, pcm16: bytes, rate: int) -> None:
        if self.file is None:
            self.file = wave.open(str(self.path), "wb")  # noqa: SIM115 - closed by close()
            self.file.setnchannels(1)
            self.file.setsampwidth(2)
            self.file.setframerate(rate)
            self.rate = rate
        self.file.writeframes(pcm16)
        self.bytes += len(pcm16)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class SessionExport:
    """The `realtime.export` command; the turn lists come from the live sessions' conversations."""

    def __init__(self, conversations: Conversations) -> None:
        self.conversations = conversations

    @command.command("realtime.export")
    def export(self, flows: Sequence[flow.Flow], path: types.Path) -> None:
        """Write each Realtime flow's bundle (turns.md, turns.json, events.jsonl, user.wav, model.wav) under path."""
        written = 0
        for exported in flows:
            if isinstance(exported, http.HTTPFlow) and exported.websocket is not None:
                directory = Path(path).expanduser() / exported.id
                summary = write_bundle(exported, directory, self.conversations.get(exported.id))
                logger.info("ai-gateway: %s written to %s", summary, directory)
                written += 1
        if not written:
            logger.warning("ai-gateway: realtime.export: none of the %d flows is a WebSocket session", len(flows))


def write_bundle(session: http.HTTPFlow, directory: Path, live: Conversation | None) -> str:
    """The bundle of one session; returns what it holds, in a few words."""
    assert session.websocket is not None
    directory.mkdir(parents=True, exist_ok=True)
    conversation = live or replay(session)
    (directory / "turns.md").write_text(turns_markdown(session, conversation, live is not None), encoding="utf-8")
    turns = {"flow": session.id, "dropped": conversation.dropped, "turns": [turn_record(t) for t in conversation.turns]}
    (directory / "turns.json").write_text(json.dumps(turns, indent=2, ensure_ascii=False), encoding="utf-8")
    tracks = {speaker: WavTrack(directory / f"{speaker}.wav") for speaker in SPEAKERS.values()}
    formats = {speaker: AudioFormat() for speaker in SPEAKERS.values()}
    try:
        with (directory / "events.jsonl").open("w", encoding="utf-8") as events:
            count = write_events(session, events, tracks, formats)
    finally:
        for track in tracks.values():
            track.close()
    audio = [f"{name}.wav {t.bytes / 2 / t.rate:,.1f} s" for name, t in tracks.items() if t.file is not None]
    return f"{len(conversation.turns)} turns, {count} events{', ' if audio else ''}{', '.join(audio)}"


def write_events(
    session: http.HTTPFlow, events: IO[str], tracks: dict[str, WavTrack], formats: dict[str, AudioFormat]
) -> int:
    """Every kept message as a JSON line, its audio (still there) appended to its speaker's track."""
    assert session.websocket is not None
    count = 0
    gemini = kind_of(session) == WireProtocol.GEMINI_LIVE  # its JSON comes in binary frames too
    for message in session.websocket.messages:
        line: dict[str, Any] = {"at": message.timestamp, "from": "client" if message.from_client else "server"}
        event = decode_json(message.content) if message.is_text or gemini else None
        if isinstance(event, dict):
            for chunk, rate in _gemini_audio(event, message.from_client) if gemini else ():
                tracks[SPEAKERS[message.from_client]].add(chunk, rate)
            if not message.from_client:
                _session_formats(event, formats)
            for chunk in _audio(event):
                fmt = formats[SPEAKERS[message.from_client]]
                tracks[SPEAKERS[message.from_client]].add(fmt.pcm16(chunk), fmt.rate)
            replace_audio(event)
            line["event"] = event
        elif isinstance(event, Malformed):
            line["text"] = message.content.decode("utf-8", "replace")
        else:
            line["binary_bytes"] = len(message.content)
        events.write(json.dumps(line, ensure_ascii=False) + "\n")
        count += 1
    return count


def _audio(event: dict[str, Any]) -> Iterator[bytes]:
    """The audio an event carries, unless it was replaced by its size already."""
    field = AUDIO_FIELDS.get(event.get("type"))  # type: ignore[arg-type]
    value = event.get(field) if field is not None else None
    if isinstance(value, str) and value and not value.startswith(PLACEHOLDER_PREFIX):
        try:
            yield base64.b64decode(value, validate=True)
        except binascii.Error:
            return


def _gemini_audio(event: dict[str, Any], from_client: bool) -> Iterator[tuple[bytes, int]]:
    """A Gemini Live message's audio (PCM16 at the rate its mime type names), each replaced by its size."""
    default = INPUT_RATE if from_client else OUTPUT_RATE
    for slot in list(audio_slots(event)):
        data, rate = slot["data"], audio_rate(slot.get("mimeType", slot.get("mime_type")), default)
        if data.startswith(PLACEHOLDER_PREFIX):
            continue
        slot["data"] = describe_audio(slot, default)
        with contextlib.suppress(binascii.Error):  # google-genai sends URL-safe base64, the servers standard
            yield base64.b64decode(data.translate(URLSAFE_BASE64), validate=True), rate


def _session_formats(event: dict[str, Any], formats: dict[str, AudioFormat]) -> None:
    """A session.created/updated sets the formats: GA under session.audio, beta at the top."""
    session = event.get("session") if event.get("type") in ("session.created", "session.updated") else None
    if not isinstance(session, dict):
        return
    audio = session.get("audio")
    if isinstance(audio, dict):
        for direction, speaker_name in (("input", "user"), ("output", "model")):
            part = audio.get(direction)
            if isinstance(part, dict) and "format" in part:
                formats[speaker_name].update(part["format"])
    for key, speaker_name in (("input_audio_format", "user"), ("output_audio_format", "model")):
        if key in session:
            formats[speaker_name].update(session[key])


def turns_markdown(session: http.HTTPFlow, conversation: Conversation, recorded: bool) -> str:
    """The conversation for people: one paragraph a turn, its notes as a list, an answer's cost in italics."""
    lines = [f"# Realtime session {session.request.path.split('?', 1)[0]}", "", f"Flow `{session.id}`."]
    if not recorded:
        lines.append("Read from the kept messages: cost and timing were not recorded.")
    if conversation.dropped:
        lines.append(f"The {conversation.dropped:,} oldest turns were dropped to stay within the caps.")
    start = conversation.turns[0].at if conversation.turns else 0.0
    for turn in conversation.turns:
        lines += ["", f"**{speaker(turn)}** `{clock(turn.at - start)}`: {said(turn)}"]
        lines += [f"- calls `{c.name or '?'}({c.arguments})` `{c.call_id or ''}`" for c in turn.calls]
        lines += [f"- {note}" for note in turn.notes]
        if turn.role == ASSISTANT:
            lines.append(f"- *{turn_summary(turn)}*")
    return "\n".join(lines) + "\n"


def turn_record(turn: Turn) -> dict[str, Any]:
    usage = turn.usage
    return {
        "role": turn.role,
        "at": turn.at,
        "text": turn.text,
        "voice": turn.voice,
        "item_id": turn.item_id,
        "response_id": turn.response_id,
        "call_id": turn.call_id,
        "status": turn.status,
        "calls": [{"name": c.name, "call_id": c.call_id, "arguments": c.arguments} for c in turn.calls],
        "notes": turn.notes,
        "usage": None if usage is None else {"input": usage.input, "cached": usage.cache_read, "output": usage.output},
        "cost_usd": turn.cost,
        "ttft_ms": _ms(turn.ttft),
        "turn_latency_ms": _ms(turn.turn_latency),
        "duration_ms": _ms(turn.duration),
        "clipped": turn.clipped,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)
