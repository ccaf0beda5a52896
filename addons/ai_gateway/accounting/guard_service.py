"""Asking a guard service for a verdict: the operator's webhook, or a `/v1/moderations` endpoint.

Over aiohttp's client, imported (`prepare`) when a policy with a service guard is applied, never
by a gateway without one (its import takes about 0.4 s, which neither startup nor the first
check's timeout should pay): a `GuardClients` keeps one ClientSession
whose keep-alive connections to each guard service are reused call after call (a check costs a
request, not a TCP and TLS handshake), TLS verified against the system's CAs, each call bounded
by the guard's timeout_ms. Whatever goes wrong is a verdict (`error`, blocking only where
on_error is closed), never an exception for the caller.
"""

from __future__ import annotations

import asyncio
import importlib
import json
from typing import TYPE_CHECKING, Any

from ai_gateway.config.guardrails import Guard, GuardKind, Verdict, allowed, failed, matched

if TYPE_CHECKING:
    import aiohttp

MAX_ANSWER_BYTES = 1 << 20


class ServiceError(Exception):
    """The service did not give a readable answer; str() is the `reason` of the error verdict."""


def prepare() -> None:
    """Import the HTTP client now, before a check is timed (a policy with a service guard was applied)."""
    importlib.import_module("aiohttp")


class GuardClients:
    """The connections a guardrail addon asks its guard services over; `close` when done."""

    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None

    async def ask(self, guard: Guard, text: str, context: dict[str, Any]) -> Verdict:
        """The guard service's verdict on `text`, within the guard's timeout."""
        try:
            async with asyncio.timeout(guard.timeout_ms / 1000):
                if guard.kind is GuardKind.MODERATION:
                    body: dict[str, Any] = {"input": text, **({"model": guard.model} if guard.model else {})}
                    return moderation_verdict(guard, await self.post_json(guard.url or "", body, guard.api_key))
                return webhook_verdict(guard, await self.post_json(guard.url or "", {**context, "text": text}))
        except TimeoutError:
            return failed(guard, "timeout")
        except Exception as e:  # refused, reset, an HTTP error, an unreadable answer: each a verdict
            return failed(guard, f"{type(e).__name__}: {e}"[:200])

    async def post_json(self, url: str, body: dict[str, Any], bearer: str | None = None) -> Any:
        """POST a JSON body, return the decoded JSON answer of a 2xx response (at most MAX_ANSWER_BYTES)."""
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else None
        async with self.client().post(url, json=body, headers=headers) as response:
            if not 200 <= response.status < 300:
                raise ServiceError(f"HTTP {response.status}")
            if (response.content_length or 0) > MAX_ANSWER_BYTES:
                raise ServiceError("answer too large")
            answer = bytearray()
            async for chunk in response.content.iter_any():
                answer += chunk
                if len(answer) > MAX_ANSWER_BYTES:
                    raise ServiceError("answer too large")
        return json.loads(answer)

    def client(self) -> aiohttp.ClientSession:
        if self.session is None:
            import aiohttp  # imported by `prepare` already: only a policy with a service guard pays for it

            # No timeout of its own (each call is bounded by its guard's), no cookies, no proxy from the environment.
            self.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None), cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
            )
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            await session.close()


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
