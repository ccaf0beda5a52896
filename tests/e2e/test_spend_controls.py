"""Spend controls that hold, end to end: concurrency cannot multiply a budget, responses the upstream
starts by itself are checked too, known keys and rate limits; the overshoot figures are printed."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import websockets
from openai import AsyncOpenAI, RateLimitError
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection, serve

from ai_gateway.accounting.limits import client_key_digest
from ai_gateway_tools.harness import GatewayProcess, scrape, select
from ai_gateway_tools.simulators.http import HttpSimulator
from ai_gateway_tools.simulators.realtime import SimulatorThread

from ..clients import wait_until, websocket_base, write_ledger
from ..conftest import LAUNCHERS

LIMIT = 100_000  # tokens
RESERVE = 15_000  # at least what one simulated response bills, so the bound below is the documented one
TARGET = 1.25


def policy_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "limits.yaml"
    path.write_text(text)
    return str(path)


def policy(tmp_path: Path, text: str) -> str:
    return policy_file(tmp_path, text + "routes:\n  /realtime: Realtime\n  /chat/completions: Completions\n")


def budget(tmp_path: Path, scope: str, tokens: int = LIMIT) -> str:
    return policy(tmp_path, f"budgets:\n  {scope}: {{tokens: {tokens}}}\n  reserve: {{tokens: {RESERVE}}}\n")


def tokens(entries) -> int:
    return sum(e.usage["input_tokens"] + e.usage["output_tokens"] for e in entries if e.kind == "response")


async def respond_until_refused(url: str, key: str, pipelined: int = 1) -> int:
    """`spend_on` a new session with this client key; returns the responses that finished."""
    async with websockets.connect(url, additional_headers={"authorization": f"Bearer {key}"}) as ws:
        await ws.recv()
        return await spend_on(ws, pipelined)


async def spend_on(ws: ClientConnection, pipelined: int) -> int:
    """Asks for responses (`pipelined` at a time, pipecat's event_id-first spelling) until a whole
    round is refused, as a client that keeps trying would; returns the responses that finished."""
    finished = 0
    while True:
        for i in range(pipelined):
            await ws.send(json.dumps({"event_id": f"c{finished}-{i}", "type": "response.create"}))
        outstanding, refused = pipelined, 0
        while outstanding:
            event = json.loads(await ws.recv())
            if event["type"] == "error" and event["error"]["code"] == "budget_exceeded":
                outstanding, refused = outstanding - 1, refused + 1
            elif event["type"] == "response.done":
                outstanding, finished = outstanding - 1, finished + 1
        if refused == pipelined:
            return finished


@pytest.fixture(scope="module")
def upstream() -> Iterator:
    with SimulatorThread(seed=21) as simulator:
        yield simulator


def test_two_concurrent_sessions_on_one_key_stay_within_the_key_budget(tmp_path, upstream, capsys):
    model = "gpt-realtime-limits-a"
    with GatewayProcess(upstream.url, options={"gateway_policy": budget(tmp_path, "client_key")}) as gateway:
        url = f"{websocket_base(gateway.url)}/v1/realtime?model={model}"

        async def both() -> list[int]:
            return await asyncio.gather(*(respond_until_refused(url, "sk-one-key") for _ in range(2)))

        finished = asyncio.run(both())
    spent = tokens(upstream.usage_for(model))
    with capsys.disabled():
        print(f"\n2 concurrent sessions, one key: {spent:,} tokens for a {LIMIT:,} budget = {spent / LIMIT:.2f}x")
    assert all(finished) and spent <= TARGET * LIMIT
    assert spent >= LIMIT - RESERVE  # the budget was used, not refused early


def test_pipelined_response_creates_cannot_multiply_a_session_budget(tmp_path, upstream, capsys):
    model = "gpt-realtime-limits-b"
    with GatewayProcess(upstream.url, options={"gateway_policy": budget(tmp_path, "session")}) as gateway:
        url = f"{websocket_base(gateway.url)}/v1/realtime?model={model}"
        asyncio.run(respond_until_refused(url, "sk-pipeliner", pipelined=10))
    spent = tokens(upstream.usage_for(model))
    with capsys.disabled():
        print(f"\n10 pipelined response.create: {spent:,} tokens for a {LIMIT:,} budget = {spent / LIMIT:.2f}x")
    assert LIMIT - RESERVE <= spent <= TARGET * LIMIT


def test_forty_concurrent_http_requests_stay_within_the_key_budget(tmp_path, capsys):
    limit = 20_000
    with (
        SimulatorThread(server=HttpSimulator(seed=22)) as upstream,
        GatewayProcess(upstream.url, options={"gateway_policy": budget(tmp_path, "client_key", limit)}) as gateway,
    ):
        client = AsyncOpenAI(api_key="sk-http-key", base_url=f"{gateway.url}/v1", max_retries=0)

        async def one() -> bool:
            try:
                await client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": "hi"}],
                    extra_headers={"x-sim-delay-ms": "200"},  # all forty are in flight at once
                )
            except RateLimitError as e:
                assert e.response.headers["retry-after"].isdigit()
                return False
            return True

        async def forty() -> list[bool]:
            return await asyncio.gather(*(one() for _ in range(40)))

        admitted = sum(asyncio.run(forty()))
        spent = sum(e.usage["prompt_tokens"] + e.usage["completion_tokens"] for e in upstream.ledger)
    with capsys.disabled():
        print(
            f"\n40 concurrent HTTP requests: {admitted} admitted, {spent:,} tokens for {limit:,} = {spent / limit:.2f}x"
        )
    assert 0 < admitted < 40 and spent <= TARGET * limit


async def vad_upstream(ws: ServerConnection) -> None:
    """An upstream with server VAD: every committed turn starts a response by itself; response.cancel
    ends it early (status cancelled), as OpenAI does, still billing what it used."""
    await ws.send(json.dumps({"type": "session.created", "session": {"model": "gpt-realtime-2025-08-28"}}))
    turn = 0
    async for message in ws:
        event = json.loads(message)
        if event["type"] == "input_audio_buffer.commit":
            turn += 1
            rid = f"resp_vad_{turn}"
            await ws.send(json.dumps({"type": "input_audio_buffer.committed", "item_id": f"item_{turn}"}))
            await ws.send(json.dumps({"type": "response.created", "response": {"id": rid, "status": "in_progress"}}))
            await ws.send(json.dumps({"type": "response.output_audio.delta", "response_id": rid, "delta": "AAAA"}))
            # the client says when it heard the delta; a cancel sent as the response started comes first
            heard = json.loads(await ws.recv())
            cancelled = heard.get("type") == "response.cancel" and heard["response_id"] == rid
            status = "cancelled" if cancelled else "completed"
            if cancelled:
                await ws.recv()  # the client's marker
            usage = {"input_tokens": 600, "output_tokens": 500 if status == "completed" else 5}
            await ws.send(
                json.dumps({"type": "response.done", "response": {"id": rid, "status": status, "usage": usage}})
            )


async def vad_turns(gateway_url: str) -> list[dict]:
    """Three server-VAD turns on `vad_upstream`, through the gateway: every event the client saw."""
    seen = []
    async with websockets.connect(f"{websocket_base(gateway_url)}/v1/realtime?model=gpt-realtime") as ws:
        await ws.recv()
        for _ in range(3):
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            while (event := json.loads(await ws.recv()))["type"] != "response.done":
                seen.append(event)
                if event["type"].endswith(".delta"):  # heard it: tell the upstream
                    await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": ""}))
            seen.append(event)
    return seen


def vad_over_budget(
    policy_path: str,
    launcher: str = "mitmdump",
    options: Mapping[str, str] | None = None,
    logs: list[str] | None = None,
) -> tuple[list[dict], dict]:
    """`vad_turns` through a gateway with this policy (and options); what the client saw and the
    gateway's metrics; its log appended to `logs`."""

    async def run() -> tuple[list[dict], dict]:
        async with serve(vad_upstream, "127.0.0.1", 0) as server:
            upstream = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            settings = {"gateway_policy": policy_path, **(options or {})}
            with GatewayProcess(upstream, launcher=launcher, options=settings) as gateway:
                seen = await vad_turns(gateway.url)
                samples = scrape(gateway.metrics_url)
            if logs is not None:
                logs.append(gateway.log())
            return seen, samples

    return asyncio.run(run())


def assert_cancelled_after_the_first_turn(seen: list[dict], samples: dict, scope: str) -> None:
    done = [e["response"]["status"] for e in seen if e["type"] == "response.done"]
    # 1,100 tokens: the first turn spends the budget; the next two are cancelled as they start
    assert done == ["completed", "cancelled", "cancelled"]
    errors = [e for e in seen if e["type"] == "error"]
    assert [e["error"]["code"] for e in errors] == ["budget_exceeded"] * 2
    enforced = select(samples, action="cancelled_response", scope=scope, reason="budget_exceeded")
    assert sum(enforced.values()) == 2


def test_responses_the_upstream_starts_by_itself_are_cancelled_over_budget(tmp_path):
    text = "budgets:\n  session: {tokens: 1000}\n  reserve: {tokens: 1}\n"
    seen, samples = vad_over_budget(policy(tmp_path, text))
    assert_cancelled_after_the_first_turn(seen, samples, "session")
    billed = select(samples, gen_ai_token_type="output")
    assert sum(v for (name, _), v in billed.items() if name.endswith("_token_usage_sum")) == 500 + 5 + 5


SHA = hashlib.sha256(b"sk-known").hexdigest()


def test_unknown_keys_are_refused_and_known_keys_limited_by_their_own_entry(tmp_path, upstream):
    text = (
        f"limits:\n  client_key: {{concurrent_sessions: 5}}\n"
        f"client_keys:\n  require: true\n  keys:\n    - {{sha256: {SHA}, name: voice, limits: {{concurrent_sessions: 1}}}}\n"
    )
    with GatewayProcess(upstream.url, options={"gateway_policy": policy(tmp_path, text)}) as gateway:
        url = f"{websocket_base(gateway.url)}/v1/realtime?model=gpt-realtime"

        async def status(key: str | None) -> int:
            headers = {"authorization": f"Bearer {key}"} if key else {}
            try:
                async with websockets.connect(url, additional_headers=headers):
                    return 101
            except websockets.InvalidStatus as e:
                return e.response.status_code

        async def second_while_first_open() -> tuple[int, int]:
            async with websockets.connect(url, additional_headers={"authorization": "Bearer sk-known"}) as ws:
                await ws.recv()
                return 101, await status("sk-known")

        assert asyncio.run(status(None)) == 401 and asyncio.run(status("sk-stranger")) == 401
        assert asyncio.run(second_while_first_open()) == (101, 429)
        assert asyncio.run(status("sk-known")) == 101  # the first session's end freed its place
        samples = scrape(gateway.metrics_url)
    assert sum(select(samples, reason="invalid_api_key").values()) == 2
    assert sum(select(samples, action="rejected_session", reason="rate_limit_exceeded").values()) == 1
    assert {dict(k[1]).get("client_key") for k in select(samples, limit="concurrent_sessions")} == {"voice"}


def restart_url(gateway: GatewayProcess) -> str:
    return f"{websocket_base(gateway.url)}/v1/realtime?model=gpt-realtime-limits-restart"


def handshake(gateway: GatewayProcess, key: str) -> int:
    """The status a Realtime handshake with this client key is answered with (101: admitted)."""

    async def connect() -> int:
        try:
            headers = {"authorization": f"Bearer {key}"}
            async with websockets.connect(restart_url(gateway), additional_headers=headers, open_timeout=30):
                return 101
        except websockets.InvalidStatus as e:
            return e.response.status_code

    return asyncio.run(connect())


def test_a_restart_does_not_forgive_spend(tmp_path, upstream):
    """Budgets live in memory; with a usage ledger, the current window's spend is charged again."""
    ledger = tmp_path / "usage.jsonl"
    options = {"gateway_policy": budget(tmp_path, "client_key", 20_000), "gateway_usage_log": str(ledger)}
    with GatewayProcess(upstream.url, options=options) as gateway:
        asyncio.run(respond_until_refused(restart_url(gateway), "sk-restarted"))
        assert handshake(gateway, "sk-restarted") == 429
    with GatewayProcess(upstream.url, options=options) as gateway:
        assert handshake(gateway, "sk-restarted") == 429
        assert "restored from the usage ledger" in gateway.log()
    with GatewayProcess(
        upstream.url, options={**options, "gateway_usage_log": str(tmp_path / "fresh.jsonl")}
    ) as gateway:
        assert handshake(gateway, "sk-restarted") == 101  # without the ledger the spend is forgotten


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_restart_restores_100_000_client_keys_before_serving_within_seconds(tmp_path, upstream, launcher):
    """A ledger of 100,000 distinct client keys in the window (quadratic before: 12,000 took 15 s
    to serve, 20,000 took 147 s). Handshakes are tried from the start: the first one answered
    waited for the restore, so the over-budget key is refused."""
    spends = [(client_key_digest("sk-spent"), 30_000), *((f"{i:016x}", 10) for i in range(100_000))]
    ledger = write_ledger(tmp_path / "usage.jsonl", spends)
    options = {"gateway_policy": budget(tmp_path, "client_key", 20_000), "gateway_usage_log": str(ledger)}
    gateway = GatewayProcess(upstream.url, options=options, launcher=launcher)
    started = time.monotonic()
    starting = threading.Thread(target=gateway.start, kwargs={"timeout": 60})
    starting.start()

    def answered() -> int | None:
        with contextlib.suppress(OSError):  # not listening yet
            return handshake(gateway, "sk-spent")
        return None

    try:
        assert wait_until(answered, timeout=30) == 429
        served = time.monotonic() - started
        assert handshake(gateway, "sk-fresh") == 101
    finally:
        starting.join()
        gateway.stop()
    restored = next(line for line in gateway.log().splitlines() if "restored from the usage ledger" in line)
    print(f"100,001 ledger lines: serving {served:.1f} s after start; {restored}")
    assert "spend of 100001 responses" in restored
    assert served < 15


@pytest.mark.parametrize(
    ("limit", "reason"), [("idle_session_seconds: 1", "session_idle"), ("max_session_seconds: 2", "session_too_long")]
)
def test_sessions_past_their_duration_or_idle_limit_are_closed_with_1008(tmp_path, upstream, limit, reason):
    options = {"gateway_policy": policy(tmp_path, f"limits:\n  client_key: {{{limit}}}\n")}
    with GatewayProcess(upstream.url, options=options) as gateway:
        code, text, seconds = asyncio.run(until_closed(gateway, busy=reason == "session_too_long"))
        samples = scrape(gateway.metrics_url)
    assert_closed_by_the_limit(code, text, seconds, samples, reason)


async def until_closed(gateway: GatewayProcess, busy: bool) -> tuple[int | None, str, float]:
    """A session kept until the gateway closes it: the close code and reason, and how long it was open."""
    url = f"{websocket_base(gateway.url)}/v1/realtime?model=gpt-realtime"
    async with websockets.connect(url) as ws:
        opened = asyncio.get_running_loop().time()
        await ws.recv()
        with pytest.raises(websockets.ConnectionClosed):
            while True:  # an idle client only waits; a busy one asks for one response after another
                if busy:
                    await ws.send(json.dumps({"type": "response.create"}))
                while json.loads(await asyncio.wait_for(ws.recv(), timeout=10))["type"] != "response.done":
                    pass
        return ws.close_code, ws.close_reason, asyncio.get_running_loop().time() - opened


def assert_closed_by_the_limit(code: int | None, text: str, seconds: float, samples: dict, reason: str) -> None:
    assert code == 1008 and "gateway allows" in text
    assert seconds < 10  # the limit plus the once-a-second clock, with room for a loaded machine
    assert sum(select(samples, action="closed_session", reason=reason).values()) == 1
    assert not select(samples, error_type="ws_close_1008")  # the gateway's own close is no upstream error


@pytest.mark.parametrize("relay", ["messages", "frames"])
def test_a_gemini_live_session_that_spent_its_budget_is_closed_after_that_turn(tmp_path, relay):
    """Gemini Live has no per-response request to refuse and no cancel: the session is closed with
    1008 after the turn that spent its budget."""
    from ai_gateway_tools.simulators.gemini_live import GeminiLiveSimulator

    text = (
        "budgets:\n  session: {tokens: 1}\n  reserve: {tokens: 1}\n"
        "routes:\n  BidiGenerateContent:\n    type: Realtime\n    protocol: gemini-live\n"
        "    request: {remove: [sec-websocket-extensions]}\n"  # as policies/gemini.yaml: frames need no compression
    )
    path = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
    with (
        SimulatorThread(server=GeminiLiveSimulator(seed=23)) as upstream,
        GatewayProcess(
            upstream.url,
            options={
                "gateway_policy": policy_file(tmp_path, text),
                "gateway_relay": relay,
                "termlog_verbosity": "debug",
            },
        ) as gateway,
    ):

        async def session() -> tuple[int, int | None]:
            turns = 0
            async with websockets.connect(f"{websocket_base(gateway.url)}{path}") as ws:
                await ws.send(json.dumps({"setup": {"model": "models/gemini-live-budget"}}))
                await ws.recv()
                with pytest.raises(websockets.ConnectionClosed):
                    for _ in range(3):
                        turn = {"turns": [{"role": "user", "parts": [{"text": "hi"}]}], "turnComplete": True}
                        await ws.send(json.dumps({"clientContent": turn}))
                        while b'"turnComplete"' not in await asyncio.wait_for(ws.recv(decode=False), 10):
                            pass
                        turns += 1
                return turns, ws.close_code

        turns, code = asyncio.run(session())
        samples = scrape(gateway.metrics_url)
    assert (turns, code) == (1, 1008)
    assert ("as frames" in gateway.log()) == (relay == "frames")
    assert sum(select(samples, action="closed_session", reason="budget_exceeded").values()) == 1
    assert len(upstream.ledger) == 1
