"""A Realtime session's bundle, written message by message: what `realtime.export` writes from a
flow's kept messages and `gateway_record` from the relay's messages as they pass.

`events.jsonl` (every message, audio replaced by its size), `user.wav` and `model.wav` (the whole
session's audio of each speaker, decoded to PCM16 in the session's negotiated format: pcm16 at its
rate, G.711 μ-law or A-law at 8 kHz; Gemini Live's at the rates its mime types name),
`turns/NNN-user.wav` and `turns/NNN-model.wav` (each turn's
audio, NNN its 1-based place in turns.json), `turns.md` and `turns.json` (the conversation). Audio
and events go to disk as they come: a writer holds in memory only where each turn's audio starts
and ends in the whole-session files, which are cut into the turns' files when it finishes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ai_gateway.accounting.items import Malformed
from ai_gateway.accounting.redaction import Redactor
from ai_gateway.protocols.gemini_live import INPUT_RATE, OUTPUT_RATE, audio_rate, audio_slots, describe_audio
from ai_gateway.protocols.json_events import decode_json
from ai_gateway.protocols.realtime_conversation import ASSISTANT, USER, Conversation, Turn
from ai_gateway.proxy.contentview import clock, said, speaker, turn_summary
from ai_gateway.proxy.history import AUDIO_FIELDS, PLACEHOLDER_PREFIX, replace_audio

PCM16_RATE = 24_000  # the Realtime API's default
G711_RATE = 8_000
# Formats as GA (`audio.input.format.type`) and beta (`input_audio_format`) sessions name them.
G711_ULAW = frozenset({"audio/pcmu", "g711_ulaw"})
G711_ALAW = frozenset({"audio/pcma", "g711_alaw"})
SPEAKERS = {True: "user", False: "model"}  # from_client -> whose audio
URLSAFE_BASE64 = str.maketrans("-_", "+/")
TURNS_DIR = "turns"
MAX_SEGMENTS = 4_096  # turns' audio spans remembered per speaker, the oldest forgotten first
COMMIT = "input_audio_buffer.commit"
COMMITTED = "input_audio_buffer.committed"
CLEARED = "input_audio_buffer.cleared"


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
    """One speaker's audio, appended chunk by chunk to a mono PCM16 WAV opened at its first chunk;
    `spans` says which turn each stretch of it belongs to (by the turn's item or response id)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: wave.Wave_write | None = None
        self.rate = 0
        self.bytes = 0
        self.spans: dict[str, list[tuple[int, int]]] = {}  # turn key -> [start, end) byte ranges

    def add(self, pcm16: bytes, rate: int) -> None:
        if self.file is None:
            self.file = wave.open(str(self.path), "wb")  # noqa: SIM115 - closed by close()
            self.file.setnchannels(1)
            self.file.setsampwidth(2)
            self.file.setframerate(rate)
            self.rate = rate
        self.file.writeframes(pcm16)
        self.bytes += len(pcm16)

    def belongs(self, key: str, start: int, end: int) -> None:
        """Audio [start, end) of the track is the turn's; adjacent stretches are joined."""
        if end <= start:
            return
        spans = self.spans.setdefault(key, [])
        if spans and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
        while len(self.spans) > MAX_SEGMENTS:
            del self.spans[next(iter(self.spans))]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def cut(self, key: str, path: Path) -> float | None:
        """The turn's audio as a WAV of its own; its seconds, None when the turn kept no audio."""
        spans = self.spans.get(key)
        if not spans or self.file is None:
            return None
        with wave.open(str(self.path), "rb") as whole, wave.open(str(path), "wb") as part:
            part.setnchannels(1)
            part.setsampwidth(2)
            part.setframerate(self.rate)
            for start, end in spans:
                whole.setpos(start // 2)
                part.writeframes(whole.readframes((end - start) // 2))
        return sum(end - start for start, end in spans) / 2 / self.rate


class BundleWriter:
    """One session's bundle in `directory`, fed its messages in order, finished with its turns."""

    def __init__(self, directory: Path, redactor: Redactor | None = None, gemini: bool = False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.gemini = gemini  # a Gemini Live session: JSON in binary frames too, audio in inline data
        self.redactor = redactor or None  # a policy without detectors redacts nothing
        self.tracks = {speaker: WavTrack(directory / f"{speaker}.wav") for speaker in SPEAKERS.values()}
        self.formats = {speaker: AudioFormat() for speaker in SPEAKERS.values()}
        self.events: IO[str] = (directory / "events.jsonl").open("w", encoding="utf-8")
        self.count = 0
        self.user_from = 0  # where the user's audio not yet given to a turn starts
        self.committed_at: int | None = None  # where the client's commit cut it

    def message(self, from_client: bool, is_text: bool, content: bytes, at: float) -> None:
        """One message: a JSON line, and its audio (when still there) appended to its speaker's track."""
        line: dict[str, Any] = {"at": at, "from": "client" if from_client else "server"}
        event = decode_json(content) if is_text or self.gemini else None
        if isinstance(event, dict):
            if self.gemini:
                for chunk, rate in gemini_audio(event, from_client):
                    self.tracks[SPEAKERS[from_client]].add(chunk, rate)
            else:
                self.audio(from_client, event)
                replace_audio(event)
            line["event"] = self.redactor.redact_value(event) if self.redactor else event
        elif isinstance(event, Malformed):
            text = content.decode("utf-8", "replace")
            line["text"] = self.redactor.redact(text) if self.redactor else text
        else:
            line["binary_bytes"] = len(content)
        self.events.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.count += 1

    def audio(self, from_client: bool, event: dict[str, Any]) -> None:
        """The event's audio into its track, and where each turn's audio starts and ends: the
        model's by response id; the user's appended since the last commit, the committed item's."""
        name = SPEAKERS[from_client]
        track, fmt = self.tracks[name], self.formats[name]
        kind = event.get("type")
        if not from_client:
            session_formats(event, self.formats)
        for chunk in _audio(event):
            start = track.bytes
            track.add(fmt.pcm16(chunk), fmt.rate)
            if not from_client and isinstance(response_id := event.get("response_id"), str):
                track.belongs(response_id, start, track.bytes)
        user = self.tracks["user"]
        if from_client and kind == COMMIT:
            self.committed_at = user.bytes
        elif not from_client and kind == COMMITTED and isinstance(item_id := event.get("item_id"), str):
            end = user.bytes if self.committed_at is None else self.committed_at
            user.belongs(item_id, self.user_from, end)
            self.user_from, self.committed_at = end, None
        elif not from_client and kind == CLEARED:
            self.user_from, self.committed_at = user.bytes, None

    def finish(self, conversation: Conversation, title: str, flow_id: str, recorded: bool) -> str:
        """The turns written, each turn's audio cut out of the whole; returns what the bundle holds."""
        self.close()
        records = [turn_record(turn, self.redactor) for turn in conversation.turns]
        for index, (turn, record) in enumerate(zip(conversation.turns, records, strict=True), 1):
            record["wav"] = self.cut_turn(turn, index)
        turns = {"flow": flow_id, "dropped": conversation.dropped, "turns": records}
        (self.directory / "turns.json").write_text(json.dumps(turns, indent=2, ensure_ascii=False), encoding="utf-8")
        markdown = turns_markdown(title, flow_id, conversation, recorded, self.redactor)
        (self.directory / "turns.md").write_text(markdown, encoding="utf-8")
        audio = [f"{name}.wav {t.bytes / 2 / t.rate:,.1f} s" for name, t in self.tracks.items() if t.file is not None]
        return f"{len(conversation.turns)} turns, {self.count} events{', ' if audio else ''}{', '.join(audio)}"

    def cut_turn(self, turn: Turn, index: int) -> str | None:
        """The turn's own WAV under turns/, named by its place in the list; None without audio."""
        if turn.role == USER:
            track, key = self.tracks["user"], turn.item_id
        elif turn.role == ASSISTANT:
            track, key = self.tracks["model"], turn.response_id
        else:
            return None
        name = f"{TURNS_DIR}/{index:03d}-{'user' if turn.role == USER else 'model'}.wav"
        if key is None or key not in track.spans:
            return None
        (self.directory / TURNS_DIR).mkdir(exist_ok=True)
        return name if track.cut(key, self.directory / name) is not None else None

    def close(self) -> None:
        """Files closed (also when the bundle is abandoned)."""
        self.events.close()
        for track in self.tracks.values():
            track.close()


def _audio(event: dict[str, Any]) -> Iterator[bytes]:
    """The audio an event carries, unless it was replaced by its size already."""
    field = AUDIO_FIELDS.get(event.get("type"))  # type: ignore[arg-type]
    value = event.get(field) if field is not None else None
    if isinstance(value, str) and value and not value.startswith(PLACEHOLDER_PREFIX):
        try:
            yield base64.b64decode(value, validate=True)
        except binascii.Error:
            return


def gemini_audio(event: dict[str, Any], from_client: bool) -> Iterator[tuple[bytes, int]]:
    """A Gemini Live message's audio (PCM16 at the rate its mime type names), each replaced by its size."""
    default = INPUT_RATE if from_client else OUTPUT_RATE
    for slot in list(audio_slots(event)):
        data, rate = slot["data"], audio_rate(slot.get("mimeType", slot.get("mime_type")), default)
        if data.startswith(PLACEHOLDER_PREFIX):
            continue
        slot["data"] = describe_audio(slot, default)
        with contextlib.suppress(binascii.Error):  # google-genai sends URL-safe base64, the servers standard
            yield base64.b64decode(data.translate(URLSAFE_BASE64), validate=True), rate


def session_formats(event: dict[str, Any], formats: dict[str, AudioFormat]) -> None:
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


def turns_markdown(
    title: str, flow_id: str, conversation: Conversation, recorded: bool, redactor: Redactor | None = None
) -> str:
    """The conversation for people: one paragraph a turn, its notes as a list, an answer's cost in italics."""
    scrub = redactor.redact if redactor else str
    lines = [f"# Realtime session {title}", "", f"Flow `{flow_id}`."]
    if not recorded:
        lines.append("Read from the kept messages: cost and timing were not recorded.")
    if conversation.dropped:
        lines.append(f"The {conversation.dropped:,} oldest turns were dropped to stay within the caps.")
    start = conversation.turns[0].at if conversation.turns else 0.0
    for turn in conversation.turns:
        lines += ["", f"**{speaker(turn)}** `{clock(turn.at - start)}`: {scrub(said(turn))}"]
        lines += [f"- calls `{c.name or '?'}({scrub(c.arguments)})` `{c.call_id or ''}`" for c in turn.calls]
        lines += [f"- {scrub(note)}" for note in turn.notes]
        if turn.role == ASSISTANT:
            lines.append(f"- *{turn_summary(turn)}*")
    return "\n".join(lines) + "\n"


def turn_record(turn: Turn, redactor: Redactor | None = None) -> dict[str, Any]:
    usage = turn.usage
    scrub = redactor.redact if redactor else str
    return {
        "role": turn.role,
        "at": turn.at,
        "text": scrub(turn.text),
        "voice": turn.voice,
        "item_id": turn.item_id,
        "response_id": turn.response_id,
        "call_id": turn.call_id,
        "status": turn.status,
        "calls": [{"name": c.name, "call_id": c.call_id, "arguments": scrub(c.arguments)} for c in turn.calls],
        "notes": [scrub(note) for note in turn.notes],
        "usage": None if usage is None else {"input": usage.input, "cached": usage.cache_read, "output": usage.output},
        "cost_usd": turn.cost,
        "ttft_ms": _ms(turn.ttft),
        "turn_latency_ms": _ms(turn.turn_latency),
        "duration_ms": _ms(turn.duration),
        "clipped": turn.clipped,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)
