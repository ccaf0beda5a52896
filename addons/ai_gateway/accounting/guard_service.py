"""Asking a guard service for a verdict: the operator's webhook, or a `/v1/moderations` endpoint.

Over aiohttp's client, imported (`prepare`) when a policy with a service guard is applied, never
by a gateway without one (its import takes about 0.4 s, which neither startup nor the first
check's timeout should pay): a `GuardClients` keeps one ClientSession
whose keep-alive connections to each guard service are reused call after call (a check costs a
request, not a TCP and TLS handshake), TLS verified against the system's CAs, each call bounded
by the guard's timeout_ms. Moderation checks are batched, many texts to a request (see
`GuardClients`): a request costs the gateway's event loop about 0.35 ms of CPU whatever it
carries. Whatever goes wrong is a verdict (`error`, blocking only where on_error is closed), for
every check of a batch, never an exception for the caller. A check nothing awaits (`soon`) costs
no task of its own: its verdict is a future the batch resolves, within the batch's deadline.

A service whose calls keep failing (dead, slow past its timeout, answering errors) is paused
(`Health`): not asked for a while, its checks an error verdict at once, so that neither a held
user item waits out a timeout nor the relay pays a request per check for a service that cannot
answer.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ai_gateway.config.guardrails import ERROR, Guard, GuardKind, Verdict, allowed, failed, matched

if TYPE_CHECKING:
    import aiohttp

MAX_ANSWER_BYTES = 1 << 20
SHUTTING_DOWN = "gateway shutting down"  # the reason of checks ended by `close`
FAILURES_BEFORE_PAUSE = 3  # calls in a row a service failed before it is paused
FIRST_PAUSE_SECONDS, LONGEST_PAUSE_SECONDS = 1.0, 30.0

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """The service did not give a readable answer; str() is the `reason` of the error verdict."""


def prepare() -> None:
    """Import the HTTP client now, before a check is timed (a policy with a service guard was applied)."""
    importlib.import_module("aiohttp")


@dataclass
class Health:
    """A guard service's calls of late. After FAILURES_BEFORE_PAUSE failed in a row it is paused:
    not asked until the pause ends, its checks an error verdict meanwhile (on_error decides, at
    once). The first call after a pause tries it again: one more failure pauses it for twice as
    long (up to LONGEST_PAUSE_SECONDS); an answer ends it all (`GuardClients.called` forgets it)."""

    failures: int = 0
    pause: float = 0.0  # the last pause's length, seconds
    until: float = float("-inf")  # the loop's time the current pause ends

    def paused(self, now: float) -> bool:
        return now < self.until

    def failed(self, now: float) -> float | None:
        """One more call failed; the pause it starts (seconds), if it starts one."""
        self.failures += 1
        if self.failures < FAILURES_BEFORE_PAUSE or self.paused(now):  # calls sent before the pause began
            return None
        self.pause = min(self.pause * 2 or FIRST_PAUSE_SECONDS, LONGEST_PAUSE_SECONDS)
        self.until = now + self.pause
        return self.pause


@dataclass
class Batch:
    """Moderation checks queued for one request: their texts, each with the future its asker awaits."""

    deadline: float  # the loop's time by which its first check is owed a verdict (the others joined later)
    texts: list[str] = field(default_factory=list)
    answers: list[asyncio.Future[Verdict]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class GuardClients:
    """The connections a guardrail addon asks its guard services over; `close` when done.

    Moderation checks share requests (`/v1/moderations` takes a list of inputs and answers a result
    for each, in order): a check nothing waits for lingers up to its guard's batch_ms for others to
    join it, at most batch_max to a request, and a held check (text the relay keeps until its
    verdict) goes at once, taking the queued ones with it. The gateway pays its CPU per request, not
    per check, and the service's rate limit counts fewer requests."""

    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None
        self.batches: dict[Guard, Batch] = {}  # only guards with checks queued: emptied at each send
        self.sending: set[asyncio.Task[None]] = set()  # moderation requests in flight
        self.calls: set[asyncio.Task[Verdict]] = set()  # webhook calls nothing awaits (`soon`)
        self.health: dict[Guard, Health] = {}  # services that failed a call since they last answered

    @property
    def busy(self) -> bool:
        """Whether `close` has anything to close: a session, checks queued or requests in flight."""
        return self.session is not None or bool(self.batches or self.sending or self.calls)

    async def ask(self, guard: Guard, text: str, context: dict[str, Any], held: bool = False) -> Verdict:
        """The guard service's verdict on `text`, within the guard's timeout (counted from now, the
        wait for a batch included: its batch's deadline is its first check's); `held`: the relay
        waits for it, so it does not linger."""
        if guard.kind is GuardKind.MODERATION:
            return await self.batched(guard, text, held)
        if (not_asked := self.paused(guard)) is not None:
            return not_asked
        try:
            async with asyncio.timeout(guard.timeout_ms / 1000):
                verdict = webhook_verdict(guard, await self.post_json(guard.url or "", {**context, "text": text}))
        except TimeoutError:
            verdict = failed(guard, "timeout")
        except Exception as e:  # refused, reset, an HTTP error, an unreadable answer: each a verdict
            verdict = went_wrong(guard, e)
        self.called(guard, verdict)
        return verdict

    def paused(self, guard: Guard) -> Verdict | None:
        """The error verdict of a check whose service is paused (not asked), or None: ask it."""
        health = self.health.get(guard)
        if health is None or not health.paused(asyncio.get_running_loop().time()):
            return None
        return failed(guard, f"not asked: the service failed its last {health.failures} calls")

    def called(self, guard: Guard, verdict: Verdict) -> None:
        """A call's verdict (an error: it failed) told to its service's health, said when it pauses
        the service and when the service answers again."""
        health = self.health.get(guard)
        if verdict.outcome != ERROR:
            if health is not None:
                del self.health[guard]
                if health.pause:
                    logger.info("ai-gateway: guardrail %r: its service answers again", guard.name)
            return
        if health is None:
            health = self.health[guard] = Health()
        pause = health.failed(asyncio.get_running_loop().time())
        if pause is not None:
            logger.warning(
                "ai-gateway: guardrail %r: its service failed %d calls in a row (the last: %s); not asked "
                "for %g s, its checks are errors meanwhile (on_error: %s)",
                guard.name, health.failures, verdict.reason, pause, guard.on_error,
            )  # fmt: skip

    def soon(self, guard: Guard, text: str, context: dict[str, Any]) -> asyncio.Future[Verdict]:
        """`ask` for a caller that does not await the verdict (text already relayed): a moderation
        check is its batch's future, no task made per check; a webhook call runs as a task."""
        if guard.kind is GuardKind.MODERATION:
            return self.batched(guard, text, held=False)
        call = asyncio.ensure_future(self.ask(guard, text, context))
        self.calls.add(call)
        call.add_done_callback(self.calls.discard)
        return call

    def batched(self, guard: Guard, text: str, held: bool) -> asyncio.Future[Verdict]:
        """The text queued in its guard's batch, which is sent now if full or held, else when its
        first check has lingered batch_ms; answered by the batch's deadline whatever happens."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Verdict] = loop.create_future()
        if (not_asked := self.paused(guard)) is not None:
            answer.set_result(not_asked)
            return answer
        batch = self.batches.get(guard)
        if batch is None:
            batch = self.batches[guard] = Batch(loop.time() + guard.timeout_ms / 1000)
        batch.texts.append(text)
        batch.answers.append(answer)
        if held or guard.batch_ms <= 0 or len(batch.texts) >= guard.batch_max:
            self.send(guard)
        elif batch.timer is None:
            batch.timer = loop.call_later(guard.batch_ms / 1000, self.send, guard)
        return answer

    def send(self, guard: Guard) -> None:
        """The guard's queued checks off in one request (those whose asker gave up left out)."""
        batch = self.batches.pop(guard, None)
        if batch is None:
            return
        if batch.timer is not None:
            batch.timer.cancel()
        kept = [(t, a) for t, a in zip(batch.texts, batch.answers, strict=True) if not a.done()]
        if kept:
            answers = [a for _, a in kept]
            task = asyncio.ensure_future(self.moderate(guard, [t for t, _ in kept], answers, batch.deadline))
            self.sending.add(task)
            task.add_done_callback(functools.partial(self.sent, guard, answers))

    def sent(self, guard: Guard, answers: list[asyncio.Future[Verdict]], task: asyncio.Task[None]) -> None:
        """A request done; checks it left unanswered (cancelled by `close` before it ran) answered now."""
        self.sending.discard(task)
        answered(answers, [failed(guard, SHUTTING_DOWN)] * len(answers))

    async def moderate(
        self, guard: Guard, texts: list[str], answers: list[asyncio.Future[Verdict]], deadline: float
    ) -> None:
        """One request for the texts, each answer given its verdict (all of them `error` if it failed)."""
        inputs: str | list[str] = texts[0] if len(texts) == 1 else texts  # one text as a string, as before batching
        body: dict[str, Any] = {"input": inputs, **({"model": guard.model} if guard.model else {})}
        verdicts = [failed(guard, SHUTTING_DOWN)] * len(texts)  # unless answered: cancelled by `close`
        try:
            async with asyncio.timeout_at(deadline):
                answer = await self.post_json(guard.url or "", body, guard.api_key)
            verdicts = moderation_verdicts(guard, answer, len(texts))
        except TimeoutError:
            verdicts = [failed(guard, "timeout")] * len(texts)
        except Exception as e:
            verdicts = [went_wrong(guard, e)] * len(texts)
        finally:
            answered(answers, verdicts)
        self.called(guard, verdicts[0])  # not reached when `close` cancelled the call

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
        """Queued checks and requests in flight ended (their askers get an `error` verdict), then
        the connections closed."""
        for guard, batch in self.batches.items():
            if batch.timer is not None:
                batch.timer.cancel()
            answered(batch.answers, [failed(guard, SHUTTING_DOWN)] * len(batch.answers))
        self.batches.clear()
        running = [*self.sending, *self.calls]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        if self.session is not None:
            session, self.session = self.session, None
            await session.close()


def went_wrong(guard: Guard, error: BaseException) -> Verdict:
    """The error verdict of a call that failed, its reason the error's type and message."""
    return failed(guard, f"{type(error).__name__}: {error}"[:200])


def answered(answers: list[asyncio.Future[Verdict]], verdicts: list[Verdict]) -> None:
    """Each check its verdict, unless its asker gave up meanwhile (timed out, cancelled)."""
    for answer, verdict in zip(answers, verdicts, strict=True):
        if not answer.done():
            answer.set_result(verdict)


def webhook_verdict(guard: Guard, answer: Any) -> Verdict:
    """The webhook answers `{"action": "allow" | "block", "reason": "..."}`."""
    action = answer.get("action") if isinstance(answer, dict) else None
    if action == "allow":
        return allowed(guard)
    if action == "block":
        reason = answer.get("reason")
        return matched(guard, reason if isinstance(reason, str) else "")
    raise ServiceError(f"expected action allow or block, got {action!r}")


def moderation_verdicts(guard: Guard, answer: Any, count: int) -> list[Verdict]:
    """The verdicts on `count` texts from one moderation answer: a result per text, in order (one
    text, sent as a string, is judged on every result, as OpenAI answers a string with one)."""
    results = answer.get("results") if isinstance(answer, dict) else None
    if not isinstance(results, list) or not results or not all(isinstance(r, dict) for r in results):
        raise ServiceError("expected results, a list of moderation results")
    if count == 1:
        return [moderation_verdict(guard, results)]
    if len(results) != count:
        raise ServiceError(f"expected {count} results, one per input, got {len(results)}")
    return [moderation_verdict(guard, [result]) for result in results]


def moderation_verdict(guard: Guard, results: list[dict[str, Any]]) -> Verdict:
    """OpenAI's moderation results on one text: flagged, or with thresholds, any named category
    scored at or above its own."""
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
