"""Asking a guard service for a verdict: the operator's webhook, or a `/v1/moderations` endpoint.

A small HTTP/1.1 client on asyncio streams (the gateway's runtime has no HTTP client library of
its own, and one POST per check needs none): one connection per call, closed after it, the whole
call bounded by the guard's timeout_ms. Whatever goes wrong is a verdict (`error`, blocking only
where on_error is closed), never an exception for the caller.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any
from urllib.parse import urlsplit

from ai_gateway.config.guardrails import Guard, GuardKind, Verdict, allowed, failed, matched

MAX_ANSWER_BYTES = 1 << 20
_SSL = ssl.create_default_context()


class ServiceError(Exception):
    """The service did not give a readable answer; str() is the `reason` of the error verdict."""


async def ask(guard: Guard, text: str, context: dict[str, Any]) -> Verdict:
    """The guard service's verdict on `text`, within the guard's timeout."""
    try:
        async with asyncio.timeout(guard.timeout_ms / 1000):
            if guard.kind is GuardKind.MODERATION:
                body: dict[str, Any] = {"input": text, **({"model": guard.model} if guard.model else {})}
                return moderation_verdict(guard, await post_json(guard.url or "", body, guard.api_key))
            return webhook_verdict(guard, await post_json(guard.url or "", {**context, "text": text}))
    except TimeoutError:
        return failed(guard, "timeout")
    except (OSError, ServiceError, ValueError) as e:
        return failed(guard, f"{type(e).__name__}: {e}"[:200])


def webhook_verdict(guard: Guard, answer: Any) -> Verdict:
    """The webhook answers `{"action": "allow" | "block", "reason": "..."}`."""
    action = answer.get("action") if isinstance(answer, dict) else None
    if action == "allow":
        return allowed(guard)
    if action == "block":
        reason = answer.get("reason")
        return matched(guard, reason if isinstance(reason, str) else "")
    raise ServiceError(f"expected action allow or block, got {action!r}")


def moderation_verdict(guard: Guard, answer: Any) -> Verdict:
    """OpenAI's moderation result: flagged, or with thresholds, any named category scored at or above its own."""
    results = answer.get("results") if isinstance(answer, dict) else None
    if not isinstance(results, list) or not results or not all(isinstance(r, dict) for r in results):
        raise ServiceError("expected results, a list of moderation results")
    for result in results:
        scores = result.get("category_scores")
        if guard.thresholds and isinstance(scores, dict):
            over = [name for name, limit in guard.thresholds if _score(scores.get(name)) >= limit]
        else:
            categories = result.get("categories")
            flagged = [k for k, v in categories.items() if v is True] if isinstance(categories, dict) else []
            over = flagged or (["flagged"] if result.get("flagged") is True else [])
        if over:
            return matched(guard, ", ".join(over))
    return allowed(guard)


def _score(value: Any) -> float:
    return float(value) if type(value) in (int, float) else 0.0


async def post_json(url: str, body: dict[str, Any], bearer: str | None = None) -> Any:
    """POST a JSON body, return the decoded JSON answer of a 2xx response."""
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    data = json.dumps(body).encode()
    headers = [
        f"POST {path} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
        "Connection: close",
        *([f"Authorization: Bearer {bearer}"] if bearer else []),
    ]
    reader, writer = await asyncio.open_connection(host, port, ssl=_SSL if secure else None)
    try:
        writer.write(("\r\n".join(headers) + "\r\n\r\n").encode() + data)
        await writer.drain()
        raw = await reader.read(MAX_ANSWER_BYTES + 1)
        while chunk := await reader.read(MAX_ANSWER_BYTES + 1 - len(raw)):
            raw += chunk
            if len(raw) > MAX_ANSWER_BYTES:
                raise ServiceError("answer too large")
    finally:
        writer.close()
    return json.loads(response_body(raw))


def response_body(raw: bytes) -> bytes:
    """The body of a whole HTTP/1.1 response read to its end; ServiceError unless 2xx."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    fields = status_line.split(" ", 2)
    if len(fields) < 2 or not fields[1].isdigit():
        raise ServiceError("not an HTTP response")
    if not 200 <= int(fields[1]) < 300:
        raise ServiceError(f"HTTP {fields[1]}")
    headers = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in header_lines)}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return dechunk(body)
    if (length := headers.get("content-length", "")).isdigit():
        return body[: int(length)]
    return body


def dechunk(body: bytes) -> bytes:
    out, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2 :]
    return out
