"""What the policy does to a request before anything else reads it: the path normalised, the client
identified by its key, client credentials removed where the gateway supplies its own, the route's
header edits and model override; and once the request is relayed, the client's key masked.

Where the client's key is passed through (no `auth` in the policy), the flow's request is what
mitmproxy writes upstream, so it cannot be masked before it has been sent. It is masked in the
first hook after that (`responseheaders`: the upstream answered, so the head has gone; `response`
for a request the gateway answered itself; `error`), so that mitmweb's flow list, exports and
saved flows show its last four characters at most from then on. Until the upstream answers,
mitmweb shows the request as it came (mitmweb's own view has published it before any addon
runs). A flow replayed from mitmweb goes out with the masked key, and is refused upstream: the
client's key is never sent again on its behalf.
"""

from __future__ import annotations

from mitmproxy import http

from ai_gateway.accounting.ledger import Source
from ai_gateway.accounting.limits import client_key_sha256, identify
from ai_gateway.config.paths import AmbiguousPath, normalise_target
from ai_gateway.config.policy import RouteType, WireProtocol
from ai_gateway.protocols.openai_http import METERED_HTTP, OPERATIONS
from ai_gateway.proxy.headers import (
    CREDENTIAL_PLACES,
    apply_header_policy,
    client_credential,
    mask_client_credentials,
    protocol_credential,
    remove_client_credentials,
    remove_protocol_credentials,
)
from ai_gateway.proxy.refusals import ambiguous_path_response
from ai_gateway.proxy.sessions import session_kind
from ai_gateway.proxy.state import (
    CLIENT_KEY_METADATA,
    KNOWN_KEY_METADATA,
    UNROUTED,
    GatewayState,
    is_websocket_upgrade,
    never_raises,
)


class RequestPolicy:
    def __init__(self, state: GatewayState) -> None:
        self.state = state

    @never_raises
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        policy = self.state.policy
        if policy is None or not self.normalise_path(flow):
            return
        request = flow.request
        route = policy.match(request.path)
        places = CREDENTIAL_PLACES.get(route.protocol)
        credential = client_credential(request)
        if places is not None:
            credential = credential or protocol_credential(request.headers, request.query, places)
        identity = identify(policy.client_keys, client_key_sha256(credential) if credential else None)
        flow.metadata[CLIENT_KEY_METADATA] = identity.label
        flow.metadata[KNOWN_KEY_METADATA] = identity.known
        if policy.auth is not None:
            remove_client_credentials(request)
            if places is not None:
                remove_protocol_credentials(request.headers, request.query, places)
        apply_header_policy(request.headers, route.request)
        model = policy.model_for(route)
        if route.type is RouteType.REALTIME and route.protocol is WireProtocol.OPENAI and model is not None:
            request.query["model"] = model
        if session_kind(route) is not None if is_websocket_upgrade(request) else route.type in METERED_HTTP:
            operation = OPERATIONS.get(route.type, route.type.value.lower())  # realtime for a Realtime session
            self.state.observability.request_arrived(flow, operation, model)

    @never_raises
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self.mask(flow)

    @never_raises
    def response(self, flow: http.HTTPFlow) -> None:
        self.mask(flow)

    @never_raises
    def error(self, flow: http.HTTPFlow) -> None:
        self.mask(flow)

    def mask(self, flow: http.HTTPFlow) -> None:
        """The request has been relayed, or never will be: the client's key is masked on the flow."""
        if CLIENT_KEY_METADATA in flow.metadata:  # a request the policy read
            mask_client_credentials(flow.request)

    def normalise_path(self, flow: http.HTTPFlow) -> bool:
        """Every later decision (route, metering, credentials, limits) reads the path the upstream
        will serve: it is normalised here, before anything else, and sent upstream as normalised.
        A path with no single reading is answered 400 and goes nowhere."""
        try:
            target = normalise_target(flow.request.path)
        except AmbiguousPath as e:
            flow.response = ambiguous_path_response(str(e))
            self.state.accounting.parse_error(Source(flow.id, UNROUTED), "ambiguous_path")
            return False
        if target != flow.request.path:
            flow.request.path = target
        return True
