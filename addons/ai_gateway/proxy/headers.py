"""Request header edits: the route's header policy and the client's credentials."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from mitmproxy.http import Headers

from ai_gateway.config.policy import HeaderPolicy, WireProtocol

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


@dataclass(frozen=True)
class CredentialPlaces:
    """Where a protocol's clients may present a key, beyond the places OpenAI accepts one."""

    headers: tuple[str, ...] = ()
    query: tuple[str, ...] = ()
    schemes: tuple[str, ...] = ()  # Authorization schemes besides Bearer


# Gemini Live: an API key in x-goog-api-key or ?key=, an ephemeral token in ?access_token= or
# `Authorization: Token`, a Vertex AI access token as `Authorization: Bearer`.
CREDENTIAL_PLACES = {
    WireProtocol.GEMINI_LIVE: CredentialPlaces(
        headers=("x-goog-api-key",), query=("key", "access_token"), schemes=("token",)
    )
}


def protocol_credential(headers: Headers, query: Mapping[str, str], places: CredentialPlaces) -> str | None:
    """The key a client presented in one of its protocol's own places."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() in places.schemes and value.strip():
        return value.strip()
    for name in places.headers:
        if value := headers.get(name, ""):
            return value
    for name in places.query:
        if value := query.get(name, ""):
            return value
    return None


def remove_protocol_credentials(headers: Headers, query: MutableMapping[str, str], places: CredentialPlaces) -> None:
    """Drop the keys a client may present in its protocol's own places (OpenAI's go in remove_client_credentials)."""
    for name in places.headers:
        headers.pop(name, None)
    for name in places.query:
        query.pop(name, None)
