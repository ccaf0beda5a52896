"""Request edits: the route's header policy and the client's credentials (removed, or masked once relayed)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from urllib.parse import quote, unquote_plus

from mitmproxy.http import Headers, Request

from ai_gateway.config.policy import HeaderPolicy, WireProtocol

# Every place OpenAI or Azure OpenAI accepts a key (and what SDKs and proxies send one in).
# Browsers cannot set headers on a WebSocket, so OpenAI accepts the key as a subprotocol and
# Azure as the `api-key` query parameter.
INSECURE_KEY_PROTOCOL = "openai-insecure-api-key."
BEARER_HEADERS = ("authorization", "proxy-authorization")
KEY_HEADERS = ("api-key", "x-api-key", "openai-api-key")
KEY_QUERY_PARAMETERS = frozenset({"api-key", "api_key", "key"})


def apply_header_policy(headers: Headers, policy: HeaderPolicy) -> None:
    for name in policy.remove:
        headers.pop(name, None)
    for name, value in policy.set:
        headers[name] = value
    for name, value in policy.add:
        headers.add(name, value)


def client_credential(request: Request) -> str | None:
    """The key a client presented, from the first of the places a key is accepted that has one."""
    return next(_presented_keys(request), None)


def _presented_keys(request: Request) -> Iterator[str]:
    headers = request.headers
    for name in BEARER_HEADERS:
        for value in headers.get_all(name):
            if value[:7].lower() == "bearer " and (token := value[7:].strip()):
                yield token
    for name in KEY_HEADERS:
        yield from filter(None, (value.strip() for value in headers.get_all(name)))
    for protocol in _offered_protocols(headers):
        if _is_key_protocol(protocol) and (key := protocol[len(INSECURE_KEY_PROTOCOL) :]):
            yield key
    yield from filter(None, split_query_keys(request.path)[1])


def remove_client_credentials(request: Request) -> None:
    """Drop every credential a client may present, so only the gateway's key goes upstream."""
    headers = request.headers
    for name in (*BEARER_HEADERS, *KEY_HEADERS):
        headers.pop(name, None)  # every field of that name, in any case
    offered = list(_offered_protocols(headers))
    kept = [protocol for protocol in offered if not _is_key_protocol(protocol)]
    if len(kept) != len(offered):
        headers.pop("sec-websocket-protocol", None)
        if kept:
            headers["sec-websocket-protocol"] = ", ".join(kept)
    path, keys = split_query_keys(request.path)
    if keys:
        request.path = path


MASK = "…"
MASKED_MIN_LENGTH = 20  # a shorter key shows none of its characters


def masked(key: str) -> str:
    """What a person may see of a client's key: its last four characters, none of a short one.
    A masked key stays as it is: masking twice shows the same."""
    if key.startswith(MASK):
        return key
    return MASK + key[-4:] if len(key) >= MASKED_MIN_LENGTH else MASK


def mask_client_credentials(request: Request) -> None:
    """Every credential a client may present (OpenAI's places and every protocol's), masked in place.

    Only for a request already relayed (or never to be): what mitmweb, exports and saved flows show
    of it afterwards. Headers without a credential are left untouched.
    """
    headers = request.headers
    places = _ALL_PLACES
    for name in (*BEARER_HEADERS, *KEY_HEADERS, *places.headers):
        values = headers.get_all(name)
        shown = [_mask_authorization(v) if name in BEARER_HEADERS else masked(v.strip()) for v in values if v]
        if values and shown != values:
            headers.set_all(name, shown)
    offered = list(_offered_protocols(headers))
    if any(_is_key_protocol(protocol) for protocol in offered):
        protocols = [
            INSECURE_KEY_PROTOCOL + masked(p[len(INSECURE_KEY_PROTOCOL) :]) if _is_key_protocol(p) else p
            for p in offered
        ]
        headers["sec-websocket-protocol"] = ", ".join(protocols)
    path = _mask_query(request.path, KEY_QUERY_PARAMETERS | set(places.query))
    if path != request.path:
        request.path = path


def _mask_authorization(value: str) -> str:
    scheme, _, credential = value.strip().partition(" ")
    return f"{scheme} {masked(credential.strip())}" if credential.strip() else masked(scheme)


def _mask_query(path: str, names: set[str]) -> str:
    """The path with the values of its key parameters masked, the rest byte for byte."""
    base, mark, query = path.partition("?")
    if not mark:
        return path
    items = query.split("&")
    for i, item in enumerate(items):
        name, _, value = item.partition("=")
        if value and unquote_plus(name).strip().lower() in names:
            items[i] = f"{name}={quote(masked(unquote_plus(value)))}"
    return f"{base}?{'&'.join(items)}"


def split_query_keys(path: str) -> tuple[str, list[str]]:
    """The path without its key parameters, and their values.

    The other parameters are kept byte for byte (mitmproxy's `query` setter would re-encode them).
    Names are matched case-insensitively, after percent-decoding, as a server might read them.
    """
    base, mark, query = path.partition("?")
    if not mark:
        return path, []
    kept, keys = [], []
    for item in query.split("&"):
        name, _, value = item.partition("=")
        if unquote_plus(name).strip().lower() in KEY_QUERY_PARAMETERS:
            keys.append(unquote_plus(value))
        else:
            kept.append(item)
    if not keys:
        return path, []
    return (f"{base}?{'&'.join(kept)}" if kept else base), keys


def _offered_protocols(headers: Headers) -> Iterator[str]:
    for value in headers.get_all("sec-websocket-protocol"):
        yield from filter(None, (protocol.strip() for protocol in value.split(",")))


def _is_key_protocol(protocol: str) -> bool:
    return protocol[: len(INSECURE_KEY_PROTOCOL)].lower() == INSECURE_KEY_PROTOCOL


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


_ALL_PLACES = CredentialPlaces(
    headers=tuple(name for places in CREDENTIAL_PLACES.values() for name in places.headers),
    query=tuple(name for places in CREDENTIAL_PLACES.values() for name in places.query),
)


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
