"""`gateway_record=DIR`: every OpenAI Realtime session written as a bundle (proxy/bundle.py) as it
closes, under mitmdump and scripts/serve, on either relay path.

SessionMetering tells the recorder of each message as it passes (`frame`, the seam both relay
paths call), so recording needs neither mitmproxy's kept history nor its WebSocket layer: the
events and both speakers' audio go to `DIR/<flow id>.partial/` as they come, and when the
session closes its turns are written, each turn's audio cut out of the whole, off the event loop,
and the directory renamed to `DIR/<flow id>`. A session holds only open files and where its turns'
audio lies in memory, whatever its length. A bundle holds no credential: no headers, the path
without its query; its events and turns are redacted as the policy's `redact:` says.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader

from ai_gateway.protocols.openai_realtime import RealtimeProtocol
from ai_gateway.protocols.realtime_conversation import Conversation
from ai_gateway.proxy.bundle import BundleWriter
from ai_gateway.proxy.state import GatewayState

if TYPE_CHECKING:
    from ai_gateway.proxy.sessions import Frame, Session

PARTIAL = ".partial"

logger = logging.getLogger(__name__)


class Recorder:
    """The `gateway_record` option and the bundles of the sessions being recorded, by flow id."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.directory: Path | None = None
        self.writers: dict[str, BundleWriter] = {}
        self.pending: set[asyncio.Future[None]] = set()

    @property
    def active(self) -> bool:
        return self.directory is not None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "gateway_record",
            str,
            "",
            "Write every OpenAI Realtime session's bundle (as realtime.export does: turns, events without "
            "audio, user and model WAVs per turn and whole) under this directory as it closes; empty: off. "
            "Streamed to disk as the session runs: nothing of its audio is held in memory.",
        )

    def configure(self, updated: set[str]) -> None:
        if "gateway_record" not in updated:
            return
        path = ctx.options.gateway_record
        try:
            directory = Path(path).expanduser() if path else None
            if directory is not None:
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.state.refuse(f"gateway_record: cannot write recordings to {path!r}: {e.strerror or e}")
            return
        self.directory = directory

    def frame(self, flow: http.HTTPFlow, message: Frame, session: Session) -> None:
        """A Realtime session's message as it passes; a recording that fails is dropped, never the relay."""
        writer = self.writers.get(flow.id)
        try:
            if writer is None:
                if self.directory is None or not isinstance(session.protocol, RealtimeProtocol):
                    return
                directory = self.directory / f"{flow.id}{PARTIAL}"
                writer = self.writers[flow.id] = BundleWriter(directory, self.state.redactor)
            writer.message(message.from_client, message.is_text, message.content, message.timestamp)
        except Exception:
            logger.exception("ai-gateway: recording %s failed; it is dropped", flow.id)
            self.abandon(flow.id)

    def finished(self, flow: http.HTTPFlow, session: Session) -> None:
        """The session closed: its bundle finished off the event loop (cutting turns reads the audio back)."""
        writer = self.writers.pop(flow.id, None)
        if writer is None:
            return
        title = flow.request.path.split("?", 1)[0]
        conversation = session.conversation or Conversation()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a script's own call): finished here
            finish(writer, conversation, title, flow.id)
            return
        pending = loop.run_in_executor(None, finish, writer, conversation, title, flow.id)
        self.pending.add(pending)
        pending.add_done_callback(self.pending.discard)

    def abandon(self, flow_id: str) -> None:
        writer = self.writers.pop(flow_id, None)
        if writer is not None:
            writer.close()
            shutil.rmtree(writer.directory, ignore_errors=True)

    async def done(self) -> None:
        """Shutdown: the bundles being finished are waited for; sessions still open were finished
        by the drain's close."""
        if self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)


def finish(writer: BundleWriter, conversation: Conversation, title: str, flow_id: str) -> None:
    """The turns written and the directory renamed to the flow's id: a bundle without `.partial` is whole."""
    try:
        summary = writer.finish(conversation, title, flow_id, recorded=True)
        final = writer.directory.with_name(flow_id)
        writer.directory.rename(final)
        logger.info("ai-gateway: recorded %s: %s", final, summary)
    except Exception:
        logger.exception("ai-gateway: recording %s could not be finished", flow_id)
