"""What the gateway's addons share: the policy in force and where billed usage goes.

Each concern is its own addon (policy file, metrics endpoint, usage log, request policy, HTTP
metering, session metering, observability, drain), as mitmproxy's bundled addons are; they read
and set this one object instead of looking each other up, so a policy reload or a new metrics
prefix reaches every addon, and the meters of open sessions, at once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

from mitmproxy import exceptions, http

from ai_gateway.accounting.billing import Accounting
from ai_gateway.accounting.ledger import Source, UsageLedger
from ai_gateway.accounting.limits import ANONYMOUS, Refusal, SpendControl
from ai_gateway.accounting.metrics import GatewayMetrics
from ai_gateway.accounting.pricing import PriceCatalog
from ai_gateway.accounting.redaction import Redactor
from ai_gateway.accounting.shared_limits import SharedLimits
from ai_gateway.config.policy import Policy, Route, RouteType
from ai_gateway.protocols.encoding import DEFAULT_MAX_BODY_BYTES
from ai_gateway.proxy.conversation import Conversations
from ai_gateway.proxy.observability import Observability
from ai_gateway.proxy.refusals import UNKNOWN_CLIENT_KEY, unknown_key_response

CLIENT_KEY_METADATA = "ai_gateway.client_key"  # the client's identity label (never the key)
KNOWN_KEY_METADATA = "ai_gateway.known_client_key"
UNROUTED = "unknown"  # the route type of what fails before it has a route (a refused path, an eager dial)

logger = logging.getLogger(__name__)


class GatewayState:
    def __init__(self) -> None:
        self.policy: Policy | None = None
        self.catalog: PriceCatalog | None = None
        self.control: SpendControl | None = None
        self.shared: SharedLimits | None = None
        self.ledger: UsageLedger | None = None
        self.metrics = GatewayMetrics("agentgateway")
        self.observability = Observability(self)
        self.conversations = Conversations(self.observability.refresh)
        self.accounting = Accounting(self.metrics, observer=self.observability)
        self.max_body_bytes = DEFAULT_MAX_BODY_BYTES
        self.redactor: Redactor | None = None  # the policy's `redact:`, None when it names no detector
        self.is_running = False

    def rewire(self) -> None:
        """Every meter holds the one Accounting: pointing it at the current metrics, ledger, prices
        and budgets makes a change reach open sessions too, from their next response on."""
        self.accounting.rewire(self.metrics, self.ledger, self.catalog, self.control, self.shared)

    def refuse(self, message: str) -> None:
        """An invalid setting: refused while running (the previous value stays), fatal at startup.

        At startup mitmproxy would print a traceback for an exception; one logged line is clearer,
        and a logged error makes mitmproxy's startup check exit non-zero.
        """
        if self.is_running:
            raise exceptions.OptionsError(message)
        logger.error("ai-gateway: %s", message)

    def route(self, flow: http.HTTPFlow) -> Route | None:
        """The flow's route under the policy in force (its path was normalised on arrival)."""
        return self.policy.match(flow.request.path) if self.policy is not None else None


def source(flow: http.HTTPFlow, route_type: RouteType, session: bool = False) -> Source:
    """Who a flow's usage is billed to: its route type and client key label."""
    return Source(flow.id, route_type.value, flow.metadata.get(CLIENT_KEY_METADATA, ANONYMOUS), session)


def is_websocket_upgrade(request: http.Request) -> bool:
    return "websocket" in request.headers.get("upgrade", "").lower()


def never_raises[Hook: Callable[..., Awaitable[None] | None]](hook: Hook) -> Hook:
    """A hook that fails must not break the relay: log it and let the flow go on.

    A hook may return an awaitable (only where it must wait for the shared limits store):
    mitmproxy awaits it before relaying the message or request, and it is guarded the same way."""

    def failed(flow: http.HTTPFlow) -> None:
        logger.exception("ai-gateway: %s failed for %s", hook.__name__, flow.request.path.split("?", 1)[0])

    async def awaited(work: Awaitable[None], flow: http.HTTPFlow) -> None:
        try:
            await work
        except Exception:
            failed(flow)

    @functools.wraps(hook)
    def guarded(self: object, flow: http.HTTPFlow) -> Awaitable[None] | None:
        try:
            work = hook(self, flow)
        except Exception:
            failed(flow)
            return None
        return None if work is None else awaited(work, flow)

    return guarded  # type: ignore[return-value]


def refused_unknown_key(state: GatewayState, flow: http.HTTPFlow, action: str) -> bool:
    """Where the policy requires a known client key and the flow has none: answered 401, counted."""
    if state.policy is None or not state.policy.client_keys.require or flow.metadata.get(KNOWN_KEY_METADATA):
        return False
    flow.response = unknown_key_response()
    state.accounting.enforced(Refusal("client_key", UNKNOWN_CLIENT_KEY), action)
    return True
