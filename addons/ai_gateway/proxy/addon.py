"""The gateway: its addons, one concern each, in the order their hooks must run."""

from __future__ import annotations

from mitmproxy import contentviews
from mitmproxy.addonmanager import Loader

from ai_gateway.proxy.collector import StartupObjects
from ai_gateway.proxy.contentview import conversation_view, gemini_view, realtime_view
from ai_gateway.proxy.drain import Drain
from ai_gateway.proxy.export import SessionExport
from ai_gateway.proxy.guardrails import Guardrails
from ai_gateway.proxy.http_guardrails import HttpGuardrails
from ai_gateway.proxy.http_metering import HttpMetering
from ai_gateway.proxy.injection import Links
from ai_gateway.proxy.metrics_endpoint import MetricsEndpoint
from ai_gateway.proxy.policy_file import PolicyFile
from ai_gateway.proxy.recorder import Recorder
from ai_gateway.proxy.replay import Replay
from ai_gateway.proxy.request_policy import RequestPolicy
from ai_gateway.proxy.retention import KeptHistory
from ai_gateway.proxy.sessions import SessionMetering
from ai_gateway.proxy.socket_relay import SocketRelay
from ai_gateway.proxy.state import GatewayState
from ai_gateway.proxy.usage_log import UsageLog


class Gateway:
    """mitmproxy runs an addon's `addons` in list order, for every hook, so the order says:

    - the drain first: on shutdown it closes open connections before anything else is closed;
    - the usage ledger next: spend is restored from it before `/metrics` answers, and it closes
      once the drain closed every connection;
    - the metric families before the policy (its shared store counts into them) and before the
      access log and traces (dropped spans are counted);
    - the request policy (path, client key, credentials) before anything reads the request;
    - the replay after the session meter: a handshake it admitted goes to the recording's
      loopback server instead of the upstream (`gateway_replay`);
    - guardrails after the meters (sessions', then HTTP's): frames, requests and responses reach
      them through SessionMetering and HttpMetering, which meter what guards may then drop;
    - observability after the meters: it ends the spans no record ended; the conversations kept
      for mitmweb beside it (an option, and an observer of the meters' records), the
      `realtime.export` command that writes them out, and the recorder (`gateway_record`);
    - the frame relay after them all: it takes an admitted handshake's WebSocket away once they
      saw the 101;
    - startup's objects frozen last, once everything else is loaded.
    """

    def __init__(self) -> None:
        self.state = GatewayState()
        self.drain = Drain()
        self.metrics_endpoint = MetricsEndpoint(self.state)
        self.policy_file = PolicyFile(self.state)
        self.request_policy = RequestPolicy(self.state)
        links = Links()  # how the gateway reaches a session on either path, one record of what it injected
        self.guardrails = Guardrails(self.state, links)
        self.http_guardrails = HttpGuardrails(self.state)
        self.http_metering = HttpMetering(self.state, self.http_guardrails)
        self.kept_history = KeptHistory(self.state)
        self.recorder = Recorder(self.state)
        self.session_metering = SessionMetering(self.state, links, self.guardrails, self.kept_history, self.recorder)
        self.frame_relay = SocketRelay(self.state, self.session_metering)  # FrameRelay's paths and `sockets`
        self.usage_log = UsageLog(self.state)
        self.replay = Replay(self.state)
        self.session_export = SessionExport(self.state)
        self.addons = [
            self.drain,
            self.usage_log,
            self.metrics_endpoint,
            self.policy_file,
            self.request_policy,
            self.http_metering,
            self.session_metering,
            self.replay,
            self.kept_history,
            self.guardrails,
            self.http_guardrails,
            self.state.observability,
            self.state.conversations,
            self.session_export,
            self.recorder,
            self.frame_relay,
            StartupObjects(self.state),
        ]

    def load(self, loader: Loader) -> None:
        contentviews.add(realtime_view)
        contentviews.add(gemini_view)
        contentviews.add(conversation_view)
        for view in (realtime_view, gemini_view, conversation_view):
            view.conversations = self.state.conversations
            view.state = self.state  # the policy's redaction in force
