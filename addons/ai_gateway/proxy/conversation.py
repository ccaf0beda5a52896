"""The conversations of Realtime sessions, kept for mitmweb's "Realtime conversation" view.

Under mitmweb (`gateway_conversations` auto) each metered OpenAI Realtime session gets a turn list
(protocols/realtime_conversation.py) fed from SessionMetering's per-frame hook: only the few event types
a turn is made of are decoded (never audio), and the meters' record of each finished response
(usage, cost, timing) reaches it as an observer, so nothing is measured twice. The turn lists of
the latest MAX_SESSIONS sessions stay, closed or not, each bounded by its own caps.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable

from mitmproxy import ctx
from mitmproxy.addonmanager import Loader
from mitmproxy.websocket import WebSocketMessage

from ai_gateway.accounting.items import Malformed
from ai_gateway.accounting.observer import Observer, ResponseRecord
from ai_gateway.protocols.json_events import MAX_CLIENT_EVENT_BYTES, decode_json, event_type
from ai_gateway.protocols.realtime_conversation import CLIENT_EVENTS, SERVER_EVENTS, Conversation

MAX_SESSIONS = 100  # turn lists kept, the oldest session's dropped first
# A frame whose type is neither at its start nor at its end is decoded only up to this size: an
# audio append in an odd key order is not worth decoding to find out.
MAX_UNTYPED_BYTES = 64 * 1024
MODES = ("auto", "on", "off")

logger = logging.getLogger(__name__)


class Conversations(Observer):
    """The addon that keeps turn lists: its option, the lists by flow id, the meters' records."""

    def __init__(self, changed: Callable[[], None]) -> None:
        self.by_flow: OrderedDict[str, Conversation] = OrderedDict()
        self.enabled = False
        self.changed = changed  # the observers in force are rebuilt when the addon turns on or off

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "gateway_conversations",
            str,
            "auto",
            "Keep each OpenAI Realtime session's turns (transcripts, tool calls, interruptions, per-turn cost "
            f"and latency) for mitmweb's 'Realtime conversation' view, for the last {MAX_SESSIONS} sessions: "
            "auto (under mitmweb), on or off.",
            choices=MODES,
        )

    def configure(self, updated: set[str]) -> None:
        if updated & {"gateway_conversations", "gateway_record"}:
            mode, recording = ctx.options.gateway_conversations, bool(getattr(ctx.options, "gateway_record", ""))
            self.enabled = mode == "on" or (mode == "auto" and ("web_port" in ctx.options or recording))
            self.active = self.enabled
            self.changed()

    def open(self, flow_id: str) -> Conversation | None:
        """A new session's turn list, or None while the addon is off."""
        if not self.enabled:
            return None
        conversation = self.by_flow[flow_id] = Conversation()
        while len(self.by_flow) > MAX_SESSIONS:
            self.by_flow.popitem(last=False)
        return conversation

    def get(self, flow_id: str) -> Conversation | None:
        return self.by_flow.get(flow_id)

    def response_finished(self, record: ResponseRecord) -> None:
        if (conversation := self.by_flow.get(record.flow_id)) is not None:
            conversation.priced(record)


def record(conversation: Conversation, message: WebSocketMessage) -> None:
    """One relayed frame into the turn list; a frame no turn is made of is not decoded. Never raises:
    the turn list is for reading, and must not cost the session its metering."""
    try:
        event = _event(message)
        if event is None:
            return
        if message.from_client:
            conversation.client_event(event, message.timestamp)
        else:
            conversation.server_event(event, message.timestamp)
    except Exception:  # a bug here must not break the relay hook
        logger.debug("ai-gateway: a frame was left out of the conversation", exc_info=True)


def replay(messages: Iterable[WebSocketMessage]) -> Conversation:
    """The turn list of a flow's kept messages, for a flow no live session recorded (read from a
    file): the same turns, without what only the meters know (cost, timing)."""
    conversation = Conversation()
    for message in messages:
        record(conversation, message)
    return conversation


def _event(message: WebSocketMessage) -> dict | None:
    if not message.is_text:
        return None
    wanted = CLIENT_EVENTS if message.from_client else SERVER_EVENTS
    content = message.content
    kind = event_type(content)
    if kind not in wanted and (kind is not None or len(content) > MAX_UNTYPED_BYTES):
        return None
    event = decode_json(content, limit=MAX_CLIENT_EVENT_BYTES)
    return None if isinstance(event, Malformed) or event.get("type") not in wanted else event
