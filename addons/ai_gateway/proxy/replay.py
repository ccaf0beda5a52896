"""`gateway_replay`: Realtime clients answered from a recording instead of the upstream.

The recording (a `realtime.export` bundle, or a flow file saved with `-w`) is read and checked
when the option is set: a bad one is refused in one line. A Realtime handshake on an OpenAI
route is then pointed at a loopback server in this process (proxy/replay_server.py) that plays
the recording's server events back as the client's events call for them. Everything else is as
for a live upstream: the session is metered, enforced, kept and shown by the same addons, so
/metrics, the ledger, the access log and traces count the replayed usage; the meter labels it
`gen_ai_system="replay"` (REPLAY_SYSTEM), which keeps it apart from the providers' own spend.
The upstream key is never needed: nothing leaves the process (a policy's key, if it names one,
reaches only the loopback server, which ignores it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from mitmproxy import ctx, http
from mitmproxy.addonmanager import Loader

from ai_gateway.config.policy import RouteType, WireProtocol
from ai_gateway.proxy.recording import Recording, RecordingError, load
from ai_gateway.proxy.replay_server import ReplayServer
from ai_gateway.proxy.state import GatewayState, is_websocket_upgrade, never_raises

REPLAYED_METADATA = "ai_gateway.replayed"
REPLAY_SYSTEM = "replay"  # the gen_ai_system of replayed usage
PACINGS = ("recorded", "fast")

logger = logging.getLogger(__name__)


class Replay:
    """The options, the recording in force, and its loopback server (started at the first session)."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.recording: Recording | None = None
        self.server: ReplayServer | None = None
        self.starting: asyncio.Task[ReplayServer] | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "gateway_replay",
            str,
            "",
            "Answer OpenAI Realtime sessions from this recording instead of the upstream: a realtime.export "
            "bundle directory or a flow file saved with -w. Empty: off.",
        )
        loader.add_option(
            "gateway_replay_pacing",
            str,
            "recorded",
            "gateway_replay's pace: recorded (each answer's events at their recorded offsets) or fast (at once).",
            choices=PACINGS,
        )

    def configure(self, updated: set[str]) -> None:
        if "gateway_replay" in updated:
            path = ctx.options.gateway_replay
            try:
                recording = load(path) if path else None
            except RecordingError as e:
                self.state.refuse(f"gateway_replay: {e}")
                return
            self.use(recording)
        if "gateway_replay_pacing" in updated and self.server is not None:
            self.server.fast = ctx.options.gateway_replay_pacing == "fast"

    def use(self, recording: Recording | None) -> None:
        """The recording in force from the next session on; sessions replaying the previous one are closed."""
        self.recording, old, self.server, self.starting = recording, self.server, None, None
        if old is not None:
            asyncio.get_running_loop().create_task(old.stop())
        if recording is None:
            return
        for note in recording.notes:
            logger.warning("ai-gateway: gateway_replay: %s", note)
        events = len(recording.messages)
        logger.info("ai-gateway: replaying %s (%d events) to Realtime clients", recording.source, events)
        # The upstream need not be reachable: mitmproxy's eager default would dial it for every client.
        if getattr(ctx.options, "connection_strategy", None) == "eager":
            ctx.options.update(connection_strategy="lazy")

    @never_raises
    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if self.recording is None or flow.response is not None or not is_websocket_upgrade(flow.request):
            return None
        route = self.state.route(flow)
        if route is None or route.type is not RouteType.REALTIME or route.protocol is not WireProtocol.OPENAI:
            return None
        if self.server is not None:
            self.point(flow, self.server)
            return None
        return self.point_when_started(flow)

    async def point_when_started(self, flow: http.HTTPFlow) -> None:
        if self.starting is None:
            self.starting = asyncio.get_running_loop().create_task(self.start())
        try:
            server = await self.starting
        except OSError as e:  # never to the upstream instead: the client is told
            self.starting = None
            flow.response = http.Response.make(502, f"gateway_replay: the replay server did not start: {e}\n")
            return
        self.point(flow, server)

    async def start(self) -> ReplayServer:
        recording = self.recording
        assert recording is not None
        server = ReplayServer(recording, ctx.options.gateway_replay_pacing == "fast")
        await server.start()
        if self.recording is recording:  # else the option changed meanwhile: this server serves only this session
            self.server = server
        return server

    @staticmethod
    def point(flow: http.HTTPFlow, server: ReplayServer) -> None:
        """The handshake goes to the loopback server instead of the upstream."""
        flow.request.scheme, flow.request.host, flow.request.port = "http", "127.0.0.1", server.port
        flow.metadata[REPLAYED_METADATA] = True

    async def done(self) -> None:
        if self.server is not None:
            await self.server.stop()
