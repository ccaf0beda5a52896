"""What becomes of a kept WebSocket message once it has been relayed: its personal data redacted
(`redact:`), and its audio either replaced by its size or, where the whole history is kept, kept
within two caps.

The frame on the wire is never changed: a message's hook runs before it is relayed, so these
edits apply to the message before it (history.trim) and to the last one at websocket_end. Where
`gateway_websocket_history` keeps every message (under mitmweb by default, or `all` to save
sessions with `-w`) the newest relayed audio stays so that `realtime.export` has audio to
write: at most `gateway_audio_session_mb` per session and `gateway_audio_total_mb` across
sessions, counted in the kept messages' bytes; past either cap the oldest kept audio is replaced
by its placeholder first (that session's for the session cap, any session's for the total).
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader
from mitmproxy.websocket import WebSocketMessage

from ai_gateway.accounting.items import Malformed
from ai_gateway.accounting.redaction import Redactor
from ai_gateway.protocols.json_events import decode_json, event_type
from ai_gateway.proxy.history import AUDIO_FIELDS, PLACEHOLDER_PREFIX, parse_history, shrink_audio, trim
from ai_gateway.proxy.state import GatewayState

MB = 1 << 20
SESSION_MB, TOTAL_MB = 64, 256  # about 8 and 33 minutes of a session's 24 kHz audio both ways, as base64


class KeptHistory:
    """The options that say what a metered session's kept history holds, and the edits of a
    message once relayed: SessionMetering calls `relayed` after each message's hook, `closed` at
    websocket_end."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.history: int | None = 1
        self.strip = True
        self.retention: AudioRetention | None = None  # with the whole history kept, and gateway_strip_audio

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "gateway_strip_audio",
            bool,
            True,
            "Replace audio payloads of kept WebSocket messages by a short placeholder once they were relayed "
            "(where the whole history is kept, as under mitmweb, once they fall out of gateway_audio_session_mb "
            "/ gateway_audio_total_mb); off keeps all audio, unbounded.",
        )
        loader.add_option(
            "gateway_websocket_history",
            str,
            "auto",
            "WebSocket messages kept per flow: a number, 'all', or 'auto' (the last one under mitmdump, "
            "all under mitmweb). mitmproxy otherwise keeps every message of a session until it closes.",
        )
        loader.add_option(
            "gateway_audio_session_mb",
            int,
            SESSION_MB,
            "Where the whole WebSocket history is kept (mitmweb; gateway_websocket_history=all), relayed audio "
            "kept per session for realtime.export and -w (MB of kept messages, about 7.5 s of 24 kHz audio per "
            "MB); past it the session's oldest audio is replaced by its size. 0: none.",
        )
        loader.add_option(
            "gateway_audio_total_mb",
            int,
            TOTAL_MB,
            "Where the whole WebSocket history is kept, relayed audio kept across all sessions (MB); past it "
            "the oldest audio of any session is replaced by its size first. 0: none.",
        )

    def configure(self, updated: set[str]) -> None:
        options = ctx.options
        if "gateway_websocket_history" in updated:
            try:
                self.history = parse_history(options.gateway_websocket_history, under_web="web_port" in options)
            except ValueError as e:
                self.state.refuse(str(e))
        caps = {"gateway_audio_session_mb", "gateway_audio_total_mb"}
        if not updated & (caps | {"gateway_strip_audio", "gateway_websocket_history"}):
            return
        if bad := [name for name in sorted(caps) if getattr(options, name) < 0]:
            self.state.refuse(f"{bad[0]}: expected a size in MB, 0 or more, got {getattr(options, bad[0])}")
            return
        self.strip = options.gateway_strip_audio
        session, total = options.gateway_audio_session_mb * MB, options.gateway_audio_total_mb * MB
        # Kept where the whole history is: under mitmweb, or `all` (saving sessions with -w).
        if self.history is not None or not (self.strip and session and total):
            self.retention = None
        elif self.retention is None:
            self.retention = AudioRetention(session, total)
        else:  # new caps apply from the next message on, to what is kept already too
            self.retention.session_cap, self.retention.total_cap = session, total

    def relayed(self, flow: http.HTTPFlow) -> None:
        """After a message's hook: the message before it has been relayed; then only the last
        `history` messages stay (None: all)."""
        assert flow.websocket is not None
        messages = flow.websocket.messages
        if len(messages) >= 2 and (self.history is None or self.history > 1):
            self.kept(flow.id, messages[-2])
        trim(messages, self.history)

    def closed(self, flow: http.HTTPFlow) -> None:
        """At websocket_end: the last message has been relayed too."""
        if flow.websocket is not None and flow.websocket.messages:
            self.kept(flow.id, flow.websocket.messages[-1])

    def kept(self, flow_id: str, message: WebSocketMessage) -> None:
        if self.state.redactor is not None:
            redact_message(message, self.state.redactor)
        if self.retention is not None:
            self.retention.keep(flow_id, message)
        elif self.strip:
            shrink_audio(message)


@dataclass(slots=True)
class KeptAudio:
    """One relayed message whose audio is still kept; `live` until it is shrunk."""

    flow_id: str
    message: WebSocketMessage
    size: int
    live: bool = True


class AudioRetention:
    """The audio kept in the history of every session, within a per-session and a total cap."""

    def __init__(self, session_bytes: int, total_bytes: int) -> None:
        self.session_cap = session_bytes
        self.total_cap = total_bytes
        self.order: deque[KeptAudio] = deque()  # every session's, oldest first (shrunk ones skipped)
        self.sessions: dict[str, deque[KeptAudio]] = {}  # each session's live ones, oldest first
        self.by_session: dict[str, int] = {}
        self.total = 0
        self.live = 0

    def keep(self, flow_id: str, message: WebSocketMessage) -> None:
        """A relayed message: its audio kept, and the oldest shrunk until both caps hold."""
        if not carries_audio(message):
            return
        kept = KeptAudio(flow_id, message, len(message.content))
        self.order.append(kept)
        self.sessions.setdefault(flow_id, deque()).append(kept)
        self.by_session[flow_id] = self.by_session.get(flow_id, 0) + kept.size
        self.total += kept.size
        self.live += 1
        session = self.sessions[flow_id]
        while self.by_session[flow_id] > self.session_cap and session:
            self.shrink(session[0])
        while self.total > self.total_cap and self.order:
            oldest = self.order.popleft()
            if oldest.live:
                self.shrink(oldest)
        if len(self.order) > 2 * self.live + 64:  # shrunk entries dropped from the shared order
            self.order = deque(kept for kept in self.order if kept.live)

    def shrink(self, kept: KeptAudio) -> None:
        """The oldest kept audio of its session replaced by its placeholder."""
        shrink_audio(kept.message)
        kept.live = False
        self.live -= 1
        self.total -= kept.size
        session = self.sessions[kept.flow_id]
        session.popleft()
        self.by_session[kept.flow_id] -= kept.size
        if not session:
            del self.sessions[kept.flow_id], self.by_session[kept.flow_id]


def carries_audio(message: WebSocketMessage) -> bool:
    """An audio event whose audio is still there, read from its leading bytes."""
    content = message.content
    return message.is_text and event_type(content) in AUDIO_FIELDS and PLACEHOLDER_PREFIX.encode() not in content


def redact_message(message: WebSocketMessage, redactor: Redactor) -> None:
    """The kept message with the personal data in its strings redacted; audio events (ids and
    audio only) are left alone, so are binary messages."""
    content = message.content
    if not message.is_text or event_type(content) in AUDIO_FIELDS:
        return
    event = decode_json(content)
    if isinstance(event, Malformed):
        text = content.decode("utf-8", "replace")
        if (redacted := redactor.redact(text)) != text:
            message.content = redacted.encode()
        return
    redacted_event = redactor.redact_value(event)
    if redacted_event != event:
        message.content = json.dumps(redacted_event, ensure_ascii=False, separators=(",", ":")).encode()
