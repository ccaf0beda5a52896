"""A recorded OpenAI Realtime session read back: a `realtime.export` bundle or a flow file saved with `-w`.

Both hold the session's events in order with the times the gateway saw them. A bundle's
`events.jsonl` has every audio payload replaced by its size (proxy/history.py's placeholder), so
the audio is cut back out of the bundle's `user.wav` and `model.wav` in order, by those sizes
(G.711 sessions re-encoded from the decoded WAV, which is exact); a flow file holds the audio
itself unless it was stripped before it was saved. Audio that cannot be rebuilt exactly (stripped,
or a WAV that is missing or not as long as the events say) comes back as silence of its recorded
length, and the recording's `notes` say so. A file that is not a recording of a Realtime session
is one `RecordingError` line naming the file and what was expected.

Audio is read from the WAV when a message is sent, so a long recording costs its events in memory,
not its audio.
"""

from __future__ import annotations

import base64
import bisect
import json
import re
import struct
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mitmproxy import exceptions, http, io

from ai_gateway.protocols.json_events import decode_json
from ai_gateway.protocols.openai_realtime import SESSION_EVENTS, requested_model
from ai_gateway.proxy.bundle import ALAW_PCM16, G711_ALAW, G711_ULAW, ULAW_PCM16, AudioFormat, session_formats
from ai_gateway.proxy.history import AUDIO_FIELDS, PLACEHOLDER_PREFIX

AS_EXPORTED = "as realtime.export writes them"
EXPECTED = "expected a realtime.export bundle (a directory with events.jsonl) or a mitmproxy flow file saved with -w"
PCM16, ULAW, ALAW = "pcm16", "ulaw", "alaw"
SILENCE = {PCM16: b"\x00\x00", ULAW: b"\xff", ALAW: b"\xd5"}  # one sample of silence
SPEAKERS = {True: "user", False: "model"}  # from_client -> the bundle's WAV
_PLACEHOLDER_SIZE = re.compile(re.escape(PLACEHOLDER_PREFIX) + r"[^:>]*: ([\d,]+) bytes")
# Server events that only a Gemini Live or GPT-Live session starts with: named in the error.
_OTHER_PROTOCOLS = {"setupComplete": "Gemini Live", "serverContent": "Gemini Live", "session.started": "GPT-Live"}


class RecordingError(ValueError):
    """A recording that cannot be replayed; its message is one line naming the file."""


@dataclass(frozen=True, slots=True)
class Audio:
    """Where a message's audio comes from: `size` bytes on the wire in `encoding`, cut from its
    speaker's WAV at `start` (PCM16 bytes), or silence when the WAV cannot give it exactly."""

    speaker: str
    encoding: str
    size: int
    start: int


@dataclass(slots=True)
class Message:
    """One recorded message. `raw` is its exact text when it can be sent as it was (a flow file's
    message with its audio); else it is rebuilt from `event` (and `audio`)."""

    at: float
    from_client: bool
    kind: str | None
    event: dict[str, Any] | None
    raw: bytes | None = None
    audio: Audio | None = None

    @property
    def audio_size(self) -> int:
        """Bytes of audio the message carries (an append, a delta), however it is stored."""
        if self.audio is not None:
            return self.audio.size
        field = AUDIO_FIELDS.get(self.kind or "")
        value = self.event.get(field) if self.event is not None and field else None
        return base64_size(value) if isinstance(value, str) else 0


class Recording:
    """A Realtime session's messages, the WAV tracks its audio is cut from, what its client asked for."""

    def __init__(self, source: Path, messages: list[Message], wavs: dict[str, Path], request_model: str | None):
        self.source = source
        self.messages = messages
        self.wavs = wavs  # speaker -> WAV whose PCM16 matches the events exactly
        self.request_model = request_model
        self.notes: list[str] = []

    @property
    def model(self) -> str | None:
        """The session's model, as its last session.created/updated named it."""
        model = None
        for message in self.messages:
            if not message.from_client and message.kind in SESSION_EVENTS and message.event is not None:
                session = message.event.get("session")
                if isinstance(session, dict) and isinstance(session.get("model"), str):
                    model = session["model"]
        return model

    def frame(self, message: Message) -> bytes:
        """The message's text as it goes on the wire, its audio put back."""
        if message.raw is not None:
            return message.raw
        assert message.event is not None
        event = message.event
        if message.audio is not None:
            event = {**event, AUDIO_FIELDS[message.kind or ""]: base64.b64encode(self.audio(message.audio)).decode()}
        return json.dumps(event, ensure_ascii=False).encode()

    def audio(self, audio: Audio) -> bytes:
        wav = self.wavs.get(audio.speaker)
        if wav is None:
            return SILENCE[audio.encoding] * (audio.size // len(SILENCE[audio.encoding]))
        width = 1 if audio.encoding in (ULAW, ALAW) else 2
        with wave.open(str(wav), "rb") as reader:
            reader.setpos(audio.start // 2)
            pcm16 = reader.readframes(audio.size // width)
        return ENCODERS[audio.encoding](pcm16) if width == 1 else pcm16


def load(path: str | Path) -> Recording:
    """The recording at `path`: a bundle directory (or its events.jsonl), else a flow file."""
    source = Path(path).expanduser()
    if source.is_dir() or source.suffix == ".jsonl":
        events = source / "events.jsonl" if source.is_dir() else source
        if not events.is_file():
            raise RecordingError(f"{source}: not a recording: no events.jsonl in it; {EXPECTED}")
        recording = read_bundle(events)
    elif source.is_file():
        recording = read_flow_file(source)
    else:
        raise RecordingError(f"{source}: no such file or directory; {EXPECTED}")
    check_realtime(recording)
    return recording


def read_bundle(events: Path) -> Recording:
    """A bundle: its events.jsonl, audio cut from its WAVs where they match the events exactly."""
    messages, binary = [], 0
    with events.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                message = _bundle_message(events, number, line)
                if message.event is None and message.raw is None:
                    binary += 1  # only its size was written
                else:
                    messages.append(message)
    if not messages:
        raise RecordingError(f"{events}: empty; expected one recorded event a line, {AS_EXPORTED}")
    recording = Recording(events, messages, {}, None)
    if binary:
        recording.notes.append(f"{binary} binary messages are left out: the bundle holds only their sizes")
    _place_audio(recording, events.parent)
    return recording


def _bundle_message(events: Path, number: int, line: str) -> Message:
    record = decode_json(line.encode())
    where = f"{events} line {number}"
    if not isinstance(record, dict):
        raise RecordingError(f"{where}: not a JSON object (truncated?); expected one event a line, {AS_EXPORTED}")
    at, side = record.get("at"), record.get("from")
    if not isinstance(at, int | float) or side not in ("client", "server"):
        raise RecordingError(f'{where}: expected an object with "at" (a time) and "from" ("client" or "server")')
    event = record.get("event")
    if isinstance(event, dict):
        return Message(at, side == "client", event.get("type") if isinstance(event.get("type"), str) else None, event)
    text = record.get("text")
    raw = text.encode() if isinstance(text, str) else None  # a malformed text frame, as it was
    return Message(at, side == "client", None, None, raw)


def _place_audio(recording: Recording, directory: Path) -> None:
    """Each audio message's place in its speaker's WAV, in order; a WAV whose length is not what
    the events add up to cannot be cut exactly, and its speaker's audio becomes silence."""
    formats = {speaker: AudioFormat() for speaker in SPEAKERS.values()}
    offsets = dict.fromkeys(SPEAKERS.values(), 0)
    for message in recording.messages:
        if message.event is None:
            continue
        if not message.from_client:
            session_formats(message.event, formats)
        size = placeholder_size(message.event.get(AUDIO_FIELDS.get(message.kind or "", "")))
        if size is None:
            continue
        speaker = SPEAKERS[message.from_client]
        encoding = _encoding(formats[speaker])
        message.audio = Audio(speaker, encoding, size, offsets[speaker])
        offsets[speaker] += size * 2 if encoding != PCM16 else size
    for speaker, needed in offsets.items():
        wav = directory / f"{speaker}.wav"
        have = _wav_bytes(wav) if wav.exists() else 0
        if needed and have == needed:
            recording.wavs[speaker] = wav
        elif needed:
            recording.notes.append(
                f"{wav.name} holds {have:,} bytes of PCM16, the events {needed:,}: its audio is replayed as silence"
            )


def _wav_bytes(wav: Path) -> int:
    try:
        with wave.open(str(wav), "rb") as reader:
            if reader.getsampwidth() != 2 or reader.getnchannels() != 1:
                raise RecordingError(f"{wav}: expected mono 16-bit PCM, {AS_EXPORTED}")
            return reader.getnframes() * 2
    except (wave.Error, EOFError) as e:
        raise RecordingError(f"{wav}: not a WAV file ({e}); expected mono 16-bit PCM, {AS_EXPORTED}") from e


def _encoding(fmt: AudioFormat) -> str:
    return ULAW if fmt.kind in G711_ULAW else ALAW if fmt.kind in G711_ALAW else PCM16


def read_flow_file(path: Path) -> Recording:
    """The first Realtime session in a flow file saved with `-w`; injected messages (the gateway's own) left out."""
    try:
        with path.open("rb") as file:
            flows = list(io.FlowReader(file).stream())
    except (exceptions.FlowReadException, ValueError, KeyError, TypeError) as e:
        raise RecordingError(f"{path}: not a readable flow file ({e or 'truncated'}); {EXPECTED}") from e
    sessions = [f for f in flows if isinstance(f, http.HTTPFlow) and f.websocket is not None]
    if not sessions:
        raise RecordingError(f"{path}: {len(flows)} flows, none a WebSocket session; {EXPECTED}")
    recordings = [_flow_recording(path, flow) for flow in sessions]
    return next((r for r in recordings if _first_server_kind(r) in SESSION_EVENTS), recordings[0])


def _flow_recording(path: Path, flow: http.HTTPFlow) -> Recording:
    assert flow.websocket is not None
    formats = {speaker: AudioFormat() for speaker in SPEAKERS.values()}
    messages = []
    for m in flow.websocket.messages:
        if m.injected or not m.is_text:  # the gateway's own; Realtime sends no binary messages
            continue
        event = decode_json(m.content)
        if not isinstance(event, dict):
            messages.append(Message(m.timestamp, m.from_client, None, None, m.content))
            continue
        kind = event.get("type") if isinstance(event.get("type"), str) else None
        if not m.from_client:
            session_formats(event, formats)
        message = Message(m.timestamp, m.from_client, kind, event, m.content)
        size = placeholder_size(event.get(AUDIO_FIELDS.get(kind or "", "")))
        if size is not None:  # stripped before it was saved: silence of its length
            message.raw = None
            message.audio = Audio(SPEAKERS[m.from_client], _encoding(formats[SPEAKERS[m.from_client]]), size, 0)
        messages.append(message)
    recording = Recording(path, messages, {}, requested_model(flow.request.url))
    if any(m.audio is not None for m in messages):
        recording.notes.append("audio was stripped before the flow was saved: it is replayed as silence")
    return recording


def check_realtime(recording: Recording) -> None:
    """A Realtime session starts with the server's session.created: anything else is another
    protocol's session, or one whose start was not kept."""
    first = _first_server_kind(recording)
    if first in SESSION_EVENTS:
        return
    source = recording.source
    events = [m.event for m in recording.messages if not m.from_client and m.event is not None]
    other = next((name for e in events for key, name in _OTHER_PROTOCOLS.items() if key in (*e, e.get("type"))), None)
    if other is not None:
        raise RecordingError(f"{source}: a {other} session; expected an OpenAI Realtime one (session.created first)")
    if first is None:
        raise RecordingError(f"{source}: no event from the server; expected an OpenAI Realtime session")
    raise RecordingError(
        f"{source}: the server's first event is {first!r}, not session.created; expected a whole OpenAI Realtime "
        "session (mitmdump keeps only the last message unless gateway_websocket_history=all)"
    )


def _first_server_kind(recording: Recording) -> str | None:
    return next((m.kind or "?" for m in recording.messages if not m.from_client), None)


def placeholder_size(value: Any) -> int | None:
    """The bytes a history placeholder says the audio was; None for anything else."""
    match = _PLACEHOLDER_SIZE.match(value) if isinstance(value, str) else None
    return int(match.group(1).replace(",", "")) if match else None


def base64_size(text: str) -> int:
    """Bytes a base64 text decodes to, from its length (placeholders count as their size)."""
    if (size := placeholder_size(text)) is not None:
        return size
    return len(text.rstrip("=")) * 3 // 4


def _g711_encoder(table: list[bytes]) -> Callable[[bytes], bytes]:
    """PCM16 back to G.711: each sample to the code that decodes to it (the nearest, for samples
    no code decodes to), so audio decoded by realtime.export is re-encoded exactly."""
    codes = sorted((int.from_bytes(pcm, "little", signed=True), code) for code, pcm in enumerate(table))
    values = [value for value, _ in codes]
    exact = {value: code for value, code in codes}

    def nearest(sample: int) -> int:
        i = min(bisect.bisect_left(values, sample), len(values) - 1)
        if i and sample - values[i - 1] < values[i] - sample:
            i -= 1
        return codes[i][1]

    def encode(pcm16: bytes) -> bytes:
        samples: Iterator[tuple[int]] = struct.iter_unpack("<h", pcm16[: len(pcm16) // 2 * 2])
        return bytes(exact[s] if s in exact else nearest(s) for (s,) in samples)

    return encode


ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    PCM16: bytes,
    ULAW: _g711_encoder(ULAW_PCM16),
    ALAW: _g711_encoder(ALAW_PCM16),
}
