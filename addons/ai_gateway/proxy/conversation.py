"""The conversations of voice sessions, kept for mitmweb's "Realtime conversation" view.

Under mitmweb (`gateway_conversations` auto) each metered OpenAI Realtime, Gemini Live and GPT-Live
session gets a turn list (protocols/conversation.py, read by its protocol's reader:
realtime_conversation.py, gemini_conversation.py, live_conversation.py) fed from SessionMetering's
per-frame hook: only the few messages a turn is made of are decoded (never audio), and the meters'
record of each finished response (usage, cost, timing) reaches it as an observer, so nothing is
measured twice. The turn lists of the latest MAX_SESSIONS sessions stay, closed or not, each
bounded by its own caps. The flow's metadata names its protocol, so a flow read from a file is
read the same way (`replay`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader
from mitmproxy.websocket import WebSocketMessage

from ai_gateway.accounting.observer import Observer, ResponseRecord
from ai_gateway.config.policy import WireProtocol
from ai_gateway.protocols.conversation import Conversation
from ai_gateway.protocols.gemini_conversation import GeminiConversation
from ai_gateway.protocols.live_conversation import LiveConversation
from ai_gateway.protocols.realtime_conversation import RealtimeConversation

MAX_SESSIONS = 100  # turn lists kept, the oldest session's dropped first
MODES = ("auto", "on", "off")
KIND_METADATA = "ai_gateway.conversation"  # the Realtime route's wire protocol; saved with the flow
# Each protocol's reader, by the name the flow's metadata holds.
KINDS: dict[str, type[Conversation]] = {
    WireProtocol.OPENAI: RealtimeConversation,
    WireProtocol.GEMINI_LIVE: GeminiConversation,
    WireProtocol.OPENAI_LIVE: LiveConversation,
}
# For a flow saved without that name: its kind from its path, as the shipped policies route them.
_GEMINI_PATHS = ("BidiGenerateContent", "BidiGenerateContentConstrained")

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
            "Keep each Realtime, Gemini Live and GPT-Live session's turns (transcripts, tool calls, interruptions, "
            "per-turn cost "
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

    def open(self, flow: http.HTTPFlow, kind: str) -> Conversation | None:
        """A new Realtime route's session's turn list (`kind` its wire protocol), or None while the addon is off."""
        if not self.enabled:
            return None
        flow.metadata[KIND_METADATA] = str(kind)
        conversation = self.by_flow[flow.id] = KINDS[kind]()
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
        conversation.frame(message.content, message.is_text, message.from_client, message.timestamp)
    except Exception:  # a bug here must not break the relay hook
        logger.debug("ai-gateway: a frame was left out of the conversation", exc_info=True)


def replay(flow: http.HTTPFlow) -> Conversation:
    """The turn list of a flow's kept messages, for a flow no live session recorded (read from a
    file): the same turns, without what only the meters know (cost, and Realtime's timing)."""
    conversation = KINDS[kind_of(flow)]()
    for message in flow.websocket.messages if flow.websocket is not None else ():
        record(conversation, message)
    return conversation


def kind_of(flow: http.HTTPFlow) -> str:
    """The protocol a session's conversation is read as: as recorded, else from its path."""
    kind = flow.metadata.get(KIND_METADATA)
    if kind in KINDS:
        return kind
    path = flow.request.path.split("?", 1)[0].rstrip("/")
    if path.endswith(_GEMINI_PATHS):
        return WireProtocol.GEMINI_LIVE
    return WireProtocol.OPENAI_LIVE if path.endswith(("/live/sessions", "/attach")) else WireProtocol.OPENAI
