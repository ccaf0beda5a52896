"""`realtime.export`: a Realtime session written out as a bundle a person can read and hear.

Callable from mitmweb's command bar (`realtime.export @focus ~/sessions`) and from mitmdump
scripts. For each selected Realtime flow it writes a directory named after the flow (the files of
proxy/bundle.py: the turns, the events with audio replaced by its size, the whole session's and
each turn's audio as WAV). Audio is only there to export when mitmproxy kept it: where the whole
history is kept (mitmweb; `gateway_websocket_history=all`) the newest relayed audio within
`gateway_audio_session_mb` and `gateway_audio_total_mb`, all of it with `gateway_strip_audio` off.

A selection it cannot export is one error (mitmweb shows it in the command bar, a script gets a
CommandError), before anything is written: no Realtime session among the flows, or a bundle's
directory that already holds files (an earlier export is never overwritten or mixed into).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from mitmproxy import command, exceptions, flow, http, types

from ai_gateway.accounting.redaction import Redactor
from ai_gateway.config.policy import WireProtocol
from ai_gateway.protocols.realtime_conversation import Conversation
from ai_gateway.proxy.bundle import BundleWriter
from ai_gateway.proxy.contentview import is_realtime_session
from ai_gateway.proxy.conversation import kind_of, replay
from ai_gateway.proxy.state import GatewayState

logger = logging.getLogger(__name__)


class SessionExport:
    """The `realtime.export` command; the turn lists come from the live sessions' conversations."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state  # the live sessions' conversations, the policy's redaction in force

    @command.command("realtime.export")
    def export(self, flows: Sequence[flow.Flow], path: types.Path) -> None:
        """Write each Realtime flow's bundle (turns, events, user and model WAVs, per turn and whole) under path."""
        sessions = [f for f in flows if isinstance(f, http.HTTPFlow) and is_realtime_session(f)]
        if not sessions:
            raise exceptions.CommandError(
                f"realtime.export: none of the {len(flows)} flows is a Realtime, Gemini Live or GPT-Live session "
                "(a WebSocket flow the gateway read as one, or on such a path)"
            )
        directories = [Path(path).expanduser() / session.id for session in sessions]
        if taken := [str(d) for d in directories if d.exists() and (not d.is_dir() or any(d.iterdir()))]:
            raise exceptions.CommandError(f"realtime.export: not overwriting {', '.join(taken)}: not empty")
        if skipped := len(flows) - len(sessions):
            logger.warning("ai-gateway: realtime.export: %d of %d flows are not Realtime sessions", skipped, len(flows))
        for session, directory in zip(sessions, directories, strict=True):
            summary = write_bundle(session, directory, self.state.conversations.get(session.id), self.state.redactor)
            logger.info("ai-gateway: %s written to %s", summary, directory)


def write_bundle(
    session: http.HTTPFlow, directory: Path, live: Conversation | None, redactor: Redactor | None = None
) -> str:
    """The bundle of one session from its kept messages; returns what it holds, in a few words."""
    assert session.websocket is not None
    writer = BundleWriter(directory, redactor, gemini=kind_of(session) == WireProtocol.GEMINI_LIVE)
    try:
        for message in session.websocket.messages:
            writer.message(message.from_client, message.is_text, message.content, message.timestamp)
    finally:
        writer.close()
    conversation = live or replay(session)
    return writer.finish(conversation, session.request.path.split("?", 1)[0], session.id, live is not None)
