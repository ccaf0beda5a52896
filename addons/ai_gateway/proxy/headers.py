"""Request header edits: the route's header policy and the client's credentials."""

from __future__ import annotations

from mitmproxy.http import Headers

from ai_gateway.config.policy import HeaderPolicy

# Browsers cannot set headers on a WebSocket, so OpenAI accepts the key as a subprotocol.
INSECURE_KEY_PROTOCOL = "openai-insecure-api-key."
CLIENT_CREDENTIAL_HEADERS = ("authorization", "api-key")
REDACTED = "[redacted by ai-gateway]"


def apply_header_policy(headers: Headers, policy: HeaderPolicy) -> None:
    for name in policy.remove:
        headers.pop(name, None)
    for name, value in policy.set:
        headers[name] = value
    for name, value in policy.add:
        headers.add(name, value)


def client_credential(headers: Headers) -> str | None:
    """The key a client presented, in any of the places OpenAI accepts one."""
    authorization = headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip() or None
    if api_key := headers.get("api-key"):
        return api_key
    for value in headers.get_all("sec-websocket-protocol"):
        for protocol in value.split(","):
            if protocol.strip().startswith(INSECURE_KEY_PROTOCOL):
                return protocol.strip().removeprefix(INSECURE_KEY_PROTOCOL) or None
    return None


def remove_client_credentials(headers: Headers) -> None:
    """Drop every credential a client may present, so only the gateway's key goes upstream."""
    for name in CLIENT_CREDENTIAL_HEADERS:
        headers.pop(name, None)
    offered = [protocol.strip() for value in headers.get_all("sec-websocket-protocol") for protocol in value.split(",")]
    kept = [p for p in offered if p and not p.startswith(INSECURE_KEY_PROTOCOL)]
    if len(kept) != len(offered):
        headers.pop("sec-websocket-protocol", None)
        if kept:
            headers["sec-websocket-protocol"] = ", ".join(kept)


def redact(headers: Headers, name: str, secret: str) -> None:
    """Replace a header carrying the secret, once the request that needed it has gone upstream."""
    if secret in headers.get(name, ""):
        headers[name] = headers[name].replace(secret, REDACTED)
