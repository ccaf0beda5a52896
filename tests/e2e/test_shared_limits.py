"""Budgets and rate limits shared through a real Redis server (`limits.store: redis://`): the
admission arithmetic in the store itself, then real gateways — `scripts/serve --workers 2` and
three separate mitmdump processes — sharing one store, with the overshoot figures printed, and
what `limits.on_store_error` does while the store is down."""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
from collections.abc import Awaitable, Iterator
from pathlib import Path

import pytest
import websockets
from openai import AsyncOpenAI, RateLimitError
from websockets.asyncio.client import ClientConnection

from ai_gateway.accounting import shared_limits
from ai_gateway.accounting.limits import Refusal
from ai_gateway.accounting.metrics import GatewayMetrics
from ai_gateway.accounting.shared_limits import Grant, KeyView, Owed, SharedLimits, _keys
from ai_gateway.config.policy import Limit, LimitPolicy, RateLimits
from ai_gateway_tools.harness import GatewayProcess, RedisServer, scrape, scrape_until
from ai_gateway_tools.simulators.http import HttpSimulator
from ai_gateway_tools.simulators.realtime import SimulatorThread

from ..clients import respond, sdk_session, until, wait_until, websocket_base
from .test_serve import WORKERS, connection_pid
from .test_spend_controls import (
    LIMIT,
    RESERVE,
    TARGET,
    assert_cancelled_after_the_first_turn,
    policy,
    spend_on,
    tokens,
    vad_over_budget,
)

STORE_ERRORS = "agentgateway_gateway_limits_store_errors_total"
OWED = "agentgateway_gateway_limits_store_owed"


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server not found: scripts/setup installs it (Debian: apt-get install redis-server)")
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def upstream() -> Iterator:
    with SimulatorThread(seed=31) as simulator:
        yield simulator


def shared_policy(tmp_path: Path, store: str, budgets: str = "", limits: str = "", on_error: str = "open") -> str:
    """A generous store timeout: on this shared 2-core machine a loaded event loop can be slower than
    the default 250 ms, and an admission that times out is admitted without a reservation (open);
    these tests measure the atomicity, test_what_a_store_outage_does the failures."""
    text = f"limits:\n  store: {store}\n  on_store_error: {on_error}\n  store_timeout_ms: 10000\n{limits}"
    if budgets:
        text += f"budgets:\n{budgets}  reserve: {{tokens: {RESERVE}}}\n"
    return policy(tmp_path, text)


def key_budget(tmp_path: Path, store: str, tokens_limit: int = LIMIT) -> str:
    return shared_policy(tmp_path, store, budgets=f"  client_key: {{tokens: {tokens_limit}}}\n")


# -- the arithmetic in the store ---------------------------------------------------------------


def test_the_store_admits_atomically_for_every_process_and_settles_the_reservation(redis_server):
    """Two clients of one store (two processes) racing for one key: reservations are held in the
    store, so together they admit what the budget allows, and settling replaces a reservation by
    the usage."""
    limits = LimitPolicy(store=redis_server.url)
    budget = Limit(tokens=10_000)

    async def race() -> tuple[list, list]:
        first, second = (
            SharedLimits(redis_server.url, GatewayMetrics("a")),
            SharedLimits(redis_server.url, GatewayMetrics("b")),
        )
        admit = [s.admit("race", limits, budget, 3600.0, RateLimits(), (4096, 0.0), True) for s in (first, second) * 4]
        verdicts = await asyncio.gather(*admit)
        granted = [v for v in verdicts if hasattr(v, "lease")]
        first.settle("race", granted[0].lease, 100, 0.0, 3600.0, limits)
        await asyncio.gather(*first.tasks)
        after = await second.admit("race", limits, budget, 3600.0, RateLimits(), (4096, 0.0), True)
        views = [first.view("race"), second.view("race")]
        await first.close()
        await second.close()
        return [*verdicts, after], views

    verdicts, views = asyncio.run(race())
    granted = [v for v in verdicts[:-1] if hasattr(v, "lease")]
    assert len(granted) == 3  # 3 x 4096 reserved reaches 10,000: the 4th and later are refused
    assert {v.code for v in verdicts[:-1] if not hasattr(v, "lease")} == {"budget_exceeded"}
    # one reservation became 100 tokens of spend (and the key's largest response is 100, below the
    # reserve): 4096 x 2 + 100 + 4096 = 12,388 >= 10,000 would refuse, 8,292 leaves room for one more
    assert hasattr(verdicts[-1], "lease")
    assert views[1].tokens == 2 * 4096 + 100 + 4096


def test_rate_limits_and_concurrent_sessions_are_counted_across_processes(redis_server):
    limits = LimitPolicy(store=redis_server.url)
    rates = RateLimits(requests_per_minute=3, concurrent_sessions=2)

    async def run() -> list:
        stores = [SharedLimits(redis_server.url, GatewayMetrics(f"p{i}")) for i in range(3)]
        outcomes = [await s.open_session("rates", f"s{i}", limits, None, 60.0, rates) for i, s in enumerate(stores)]
        stores[0].close_session("rates", "s0", 60.0, limits)  # one open: room for another
        await asyncio.gather(*stores[0].tasks)
        outcomes.append(await stores[2].open_session("rates", "s3", limits, None, 60.0, rates))
        stores[1].close_session("rates", "s1", 60.0, limits)
        await asyncio.gather(*stores[1].tasks)
        outcomes.append(await stores[0].open_session("rates", "s4", limits, None, 60.0, rates))
        for s in stores:
            await s.close()
        return outcomes

    first, second, third, fourth, fifth = asyncio.run(run())
    assert hasattr(first, "lease") and hasattr(second, "lease")
    assert third.code == "rate_limit_exceeded"  # two sessions open at once, across processes
    assert hasattr(fourth, "lease")  # the refused handshake was not counted as a request
    assert fifth.code == "rate_limit_exceeded" and fifth.retry_after > 0  # the 4th request this minute


def test_what_a_dead_process_held_frees_itself_when_its_lease_ends(redis_server):
    """A process that admitted a response (or opened a session) and died never settles it: its
    lease is not renewed, and once it ends the key is no longer blocked."""
    limits = LimitPolicy(store=redis_server.url)
    budget, rates = Limit(tokens=4000), RateLimits(concurrent_sessions=1)

    async def run() -> list:
        dead = SharedLimits(redis_server.url, GatewayMetrics("dead"), lease_seconds=0.5)
        alive = SharedLimits(redis_server.url, GatewayMetrics("alive"))
        held = await dead.admit("lease", limits, budget, 3600.0, rates, (4096, 0.0), True)
        opened = await dead.open_session("lease-s", "s-dead", limits, None, 3600.0, rates)
        await dead.close()  # dies: nothing settled, nothing renewed
        blocked = [
            await alive.admit("lease", limits, budget, 3600.0, rates, (4096, 0.0), True),
            await alive.open_session("lease-s", "s-alive", limits, None, 3600.0, rates),
        ]

        async def admitted(verdict: Awaitable[Grant | Refusal]) -> Grant | None:
            return v if isinstance(v := await verdict, Grant) else None

        freed = [  # the leases end 0.5 s after they were taken
            await until(lambda: admitted(alive.admit("lease", limits, budget, 3600.0, rates, (4096, 0.0), True))),
            await until(lambda: admitted(alive.open_session("lease-s", "s-alive", limits, None, 3600.0, rates))),
        ]
        await alive.close()
        return [held, opened, *blocked, *freed]

    held, opened, *rest = asyncio.run(run())
    assert hasattr(held, "lease") and hasattr(opened, "lease")
    assert [getattr(v, "code", "admitted") for v in rest] == [
        "budget_exceeded", "rate_limit_exceeded", "admitted", "admitted",
    ]  # fmt: skip


def owed_gauges(samples: dict) -> tuple[float, float, float]:
    """(tokens, usd, keys) a gateway owes the store, from its /metrics samples or registry."""
    tokens, usd = (samples.get((OWED, frozenset({("unit", unit)})), 0.0) for unit in ("tokens", "usd"))
    return tokens, usd, samples.get((f"{OWED}_keys", frozenset()), 0.0)


def registry_samples(metrics: GatewayMetrics) -> dict:
    return {(s.name, frozenset(s.labels.items())): s.value for f in metrics.registry.collect() for s in f.samples}


@pytest.mark.parametrize("wake", ["timer", "admission"])
def test_usage_owed_in_an_outage_is_one_total_per_key_and_reaches_the_store_when_it_answers(monkeypatch, wake):
    """Settles that fail while the store is down are owed, added up per key; once it answers
    again they reach it, after the flush timer's second with no other operation, or at once after
    any operation that succeeds (here with a timer too long to be the one), and the gauges return to 0."""
    if wake == "admission":
        monkeypatch.setattr(shared_limits, "FLUSH_SECONDS", 3600.0)
    with RedisServer() as store:
        limits = LimitPolicy(store=store.url)

        async def run() -> tuple[dict, tuple, tuple, list[KeyView]]:
            metrics = GatewayMetrics("agentgateway")
            gateway, reader = SharedLimits(store.url, metrics), SharedLimits(store.url, GatewayMetrics("r"))
            store.stop()
            for label, used, usd in (("k1", 100, 0.5), ("k1", 50, 0.25), ("k2", 10, 0.0), ("k3", 0, 0.0)):
                gateway.settle(label, None, used, usd, 3600.0, limits)
            await asyncio.gather(*gateway.tasks)
            owed = {label: (o.tokens, o.usd) for label, o in gateway.owed.items()}
            during = owed_gauges(registry_samples(metrics))
            store.start()
            if wake == "admission":
                await gateway.admit("k-other", limits, None, 3600.0, RateLimits(), (1, 0.0), False)

            async def nothing_owed() -> bool:
                return not gateway.owed

            await until(nothing_owed, timeout=10)
            after = owed_gauges(registry_samples(metrics))
            views = []
            for label in ("k1", "k2"):
                reader.settle(label, None, 0, 0.0, 3600.0, limits)  # nothing spent: reads the key
                await asyncio.gather(*reader.tasks)
                views.append(reader.view(label))
            await gateway.close()
            await reader.close()
            return owed, during, after, views

        owed, during, after, views = asyncio.run(run())
    assert owed == {"k1": (150, 0.75), "k2": (10, 0.0)}  # one total per key; nothing owed for nothing spent
    assert during == (160, 0.75, 2) and after == (0, 0, 0)
    assert [(v.tokens, v.usd) for v in views] == [(150, 0.75), (10, 0.0)]


def test_a_flush_sent_again_is_taken_once_and_a_late_older_series_not_at_all(redis_server):
    """A flush the store took but whose reply was lost is sent again: the store adds only what the
    series grew since, and a late copy of an older series of the same process adds nothing."""

    async def run() -> list[tuple[float, float]]:
        gateway = SharedLimits(redis_server.url, GatewayMetrics("flush"))
        seen = []
        for owed in (Owed(2, 10, 0.1), Owed(2, 10, 0.1), Owed(1, 99, 9.0), Owed(2, 15, 0.3), Owed(2, 15, 0.3)):
            args = gateway.flush_args(owed, 3600.0)
            reply = await gateway.flush_script(keys=_keys("flush-again"), args=args)
            seen.append((float(reply[3]), round(float(reply[4]), 9)))
        other = SharedLimits(redis_server.url, GatewayMetrics("other"))  # another process: its own series
        reply = await other.flush_script(keys=_keys("flush-again"), args=other.flush_args(Owed(1, 1, 0.0), 3600.0))
        seen.append((float(reply[3]), round(float(reply[4]), 9)))
        await gateway.close()
        await other.close()
        return seen

    assert asyncio.run(run()) == [(10, 0.1), (10, 0.1), (10, 0.1), (15, 0.3), (15, 0.3), (16, 0.3)]


# -- real gateways sharing one store ---------------------------------------------------------


async def connect(url: str, key: str) -> ClientConnection:
    ws = await websockets.connect(url, additional_headers={"authorization": f"Bearer {key}"})
    await ws.recv()  # session.created
    return ws


def overshoot(label: str, spent: int, limit: int, capsys) -> float:
    with capsys.disabled():
        print(f"\n{label}: {spent:,} tokens for a {limit:,} budget = {spent / limit:.2f}x")
    return spent / limit


@pytest.mark.parametrize("pipelined", [1, 10], ids=["sessions", "pipelined"])
def test_three_gateway_processes_share_one_key_budget(tmp_path, redis_server, upstream, capsys, pipelined):
    model = f"gpt-realtime-shared-{pipelined}"
    key = f"sk-three-{pipelined}"
    options = {"gateway_policy": key_budget(tmp_path, redis_server.url)}
    gateways = [GatewayProcess(upstream.url, options=options) for _ in range(3)]
    for gateway in gateways:
        gateway.start()
    try:

        async def drive() -> list[int]:
            urls = [f"{websocket_base(g.url)}/v1/realtime?model={model}" for g in gateways]
            sessions = [await connect(url, key) for url in urls]
            try:
                return await asyncio.gather(*(spend_on(ws, pipelined) for ws in sessions))
            finally:
                for ws in sessions:
                    await ws.close()

        finished = asyncio.run(drive())
    finally:
        for gateway in gateways:
            gateway.stop()
    spent = tokens(upstream.usage_for(model))
    ratio = overshoot(f"3 processes, one key, {pipelined} response.create at a time", spent, LIMIT, capsys)
    assert sum(finished) and ratio <= TARGET
    assert spent >= LIMIT - RESERVE  # the budget was used, not refused early


@pytest.mark.slow
@pytest.mark.parametrize("pipelined", [1, 10], ids=["sessions", "pipelined"])
def test_serve_workers_share_one_key_budget(tmp_path, redis_server, upstream, capsys, pipelined):
    model = f"gpt-realtime-shared-workers-{pipelined}"
    options = {"gateway_policy": key_budget(tmp_path, redis_server.url)}
    with GatewayProcess(upstream.url, launcher="serve", args=WORKERS, options=options) as gateway:
        url = f"{websocket_base(gateway.url)}/v1/realtime?model={model}"

        async def drive() -> tuple[list[int], set[int]]:
            sessions, pids = [], set()
            while len(pids) < 2:  # the kernel spreads connections by a hash: open until both workers hold one
                assert len(sessions) < 40
                since = len(gateway.log())
                ws = await connect(url, f"sk-workers-{pipelined}")
                pid = functools.partial(connection_pid, gateway, ws.local_address[1], since)
                pids.add(await asyncio.to_thread(wait_until, pid))
                sessions.append(ws)
            try:
                return await asyncio.gather(*(spend_on(ws, pipelined) for ws in sessions)), pids
            finally:
                for ws in sessions:
                    await ws.close()

        finished, pids = asyncio.run(drive())
    spent = tokens(upstream.usage_for(model))
    label = f"scripts/serve --workers 2, {len(finished)} sessions on one key, {pipelined} response.create at a time"
    ratio = overshoot(label, spent, LIMIT, capsys)
    assert len(pids) == 2 and sum(finished) and ratio <= TARGET
    assert spent >= LIMIT - RESERVE


def test_a_key_that_spent_its_budget_through_one_gateway_is_refused_by_another(tmp_path, redis_server, upstream):
    """The openai SDK's GA Realtime client: one response through one gateway spends the key's
    budget; the same key's next handshake on a second gateway (sharing the store) is refused."""
    model = "gpt-realtime-shared-sdk"
    options = {"gateway_policy": key_budget(tmp_path, redis_server.url, 1)}
    with (
        GatewayProcess(upstream.url, options=options) as first,
        GatewayProcess(upstream.url, options=options) as second,
    ):
        done = asyncio.run(sdk_session(first.url, model, metadata=({},), api_key="sk-sdk-shared"))
        assert done[0].response.usage.total_tokens > 1
        with pytest.raises(websockets.InvalidStatus) as refused:
            asyncio.run(sdk_session(second.url, model, metadata=({},), api_key="sk-sdk-shared"))
    assert refused.value.response.status_code == 429
    assert json.loads(refused.value.response.body)["error"]["code"] == "budget_exceeded"


@pytest.mark.parametrize("layout", ["3 processes", "serve --workers 2"])
def test_forty_concurrent_http_requests_share_one_key_budget(tmp_path, redis_server, capsys, layout):
    limit = 20_000
    key = f"sk-http-{layout.replace(' ', '')}"
    options = {"gateway_policy": key_budget(tmp_path, redis_server.url, limit)}
    with SimulatorThread(server=HttpSimulator(seed=32)) as http_upstream:
        if layout == "3 processes":
            gateways = [GatewayProcess(http_upstream.url, options=options) for _ in range(3)]
        else:  # forty connections: the kernel gives both workers some (all on one: 2^-39)
            gateways = [GatewayProcess(http_upstream.url, launcher="serve", args=WORKERS, options=options)]
        for gateway in gateways:
            gateway.start()
        try:
            clients = [AsyncOpenAI(api_key=key, base_url=f"{g.url}/v1", max_retries=0) for g in gateways]

            async def one(client: AsyncOpenAI) -> bool:
                try:
                    await client.chat.completions.create(
                        model="gpt-4o-mini",
                        messages=[{"role": "user", "content": "hi"}],
                        extra_headers={"x-sim-delay-ms": "200"},  # all forty are in flight at once
                    )
                except RateLimitError:
                    return False
                return True

            async def forty() -> list[bool]:
                return await asyncio.gather(*(one(clients[i % len(clients)]) for i in range(40)))

            admitted = sum(asyncio.run(forty()))
        finally:
            for gateway in gateways:
                gateway.stop()
        spent = sum(e.usage["prompt_tokens"] + e.usage["completion_tokens"] for e in http_upstream.ledger)
    ratio = overshoot(f"40 concurrent HTTP requests, {layout}, {admitted} admitted", spent, limit, capsys)
    assert 0 < admitted < 40 and ratio <= TARGET


def test_spend_in_the_store_survives_a_gateway_restart(tmp_path, redis_server, upstream):
    model = "gpt-realtime-shared-restart"
    options = {"gateway_policy": key_budget(tmp_path, redis_server.url, 30_000)}

    async def until_refused(gateway: GatewayProcess) -> int:
        ws = await connect(f"{websocket_base(gateway.url)}/v1/realtime?model={model}", "sk-restart")
        try:
            return await spend_on(ws, 1)
        finally:
            await ws.close()

    with GatewayProcess(upstream.url, options=options) as gateway:
        assert asyncio.run(until_refused(gateway)) > 0
    with GatewayProcess(upstream.url, options=options) as gateway:  # no ledger: the store remembers
        with pytest.raises(websockets.InvalidStatus) as refused:
            asyncio.run(until_refused(gateway))
    assert refused.value.response.status_code == 429
    assert json.loads(refused.value.response.body)["error"]["code"] == "budget_exceeded"


def test_responses_the_upstream_starts_are_cancelled_against_the_shared_budget(tmp_path, redis_server):
    budgets = "  client_key: {tokens: 1000}\n"
    text = shared_policy(tmp_path, redis_server.url, budgets=budgets).replace(f"{{tokens: {RESERVE}}}", "{tokens: 1}")
    seen, samples = vad_over_budget(text)
    assert_cancelled_after_the_first_turn(seen, samples, "client_key")


@pytest.mark.parametrize("launchers", [("mitmdump", "serve"), ("serve", "mitmdump")], ids=["A-mitmdump", "A-serve"])
def test_spend_in_a_store_outage_reaches_the_store_when_it_answers_again(tmp_path, upstream, capsys, launchers):
    """Issue #20: gateway A spends past a key's budget while the store is down (on_store_error
    open); the store comes back (empty, same port) and, with no further request to A, A's owed
    usage reaches it: A's owed gauge returns to 0 and gateway B refuses the key."""
    model, key = f"gpt-realtime-owed-{launchers[0]}", f"sk-owed-{launchers[0]}"
    with RedisServer() as store:
        options = {"gateway_policy": key_budget(tmp_path, store.url, 1000)}
        with (
            GatewayProcess(upstream.url, launcher=launchers[0], options=options) as a,
            GatewayProcess(upstream.url, launcher=launchers[1], options=options) as b,
        ):
            url_a, url_b = (f"{websocket_base(g.url)}/v1/realtime?model={model}" for g in (a, b))

            async def spend_while_down() -> None:
                ws = await connect(url_a, key)
                store.stop()
                for _ in range(3):
                    await respond(ws)
                await ws.close()

            asyncio.run(spend_while_down())
            spent = tokens(upstream.usage_for(model))
            during = owed_gauges(scrape_until(a.metrics_url, lambda s: owed_gauges(s)[0] == spent))
            store.start()

            async def refused_by_b() -> int | None:
                try:
                    await (await connect(url_b, key)).close()
                except websockets.InvalidStatus as e:
                    return e.response.status_code
                return None

            status = wait_until(lambda: asyncio.run(refused_by_b()), timeout=15)
            after = owed_gauges(scrape_until(a.metrics_url, lambda s: owed_gauges(s)[0] == 0))
    overshoot(f"A ({launchers[0]}) in the outage, then B ({launchers[1]}) refused", spent, 1000, capsys)
    assert spent > 1000 and during[0] == spent and during[2] == 1
    assert status == 429 and after == (0, 0, 0)


@pytest.mark.slow
@pytest.mark.parametrize("on_error", ["open", "closed"])
def test_what_a_store_outage_does(tmp_path, upstream, on_error):
    """The store stops answering: `open` admits, `closed` refuses with 503; the errors are counted
    and logged once per outage, and the relay of an open session is not disturbed."""
    with RedisServer() as store:
        text = shared_policy(tmp_path, store.url, budgets=f"  client_key: {{tokens: {LIMIT}}}\n", on_error=on_error)
        with GatewayProcess(upstream.url, options={"gateway_policy": text}) as gateway:
            url = f"{websocket_base(gateway.url)}/v1/realtime?model=gpt-realtime-outage-{on_error}"

            async def drive() -> list[str]:
                ws = await connect(url, "sk-outage")
                await respond(ws)
                store.stop()
                outcomes = []
                for _ in range(3):
                    await ws.send(json.dumps({"type": "response.create"}))
                    while True:
                        event = json.loads(await ws.recv())
                        if event["type"] in ("response.done", "error"):
                            outcomes.append(event["type"] if event["type"] != "error" else event["error"]["code"])
                            break
                await ws.close()
                try:
                    await connect(url, "sk-outage")
                    outcomes.append("handshake admitted")
                except websockets.InvalidStatus as e:
                    outcomes.append(f"handshake {e.response.status_code}")
                return outcomes

            outcomes = asyncio.run(drive())
            errors = sum(v for (name, _), v in scrape(gateway.metrics_url).items() if name == STORE_ERRORS)
            log = gateway.log()
    if on_error == "open":
        assert outcomes == ["response.done"] * 3 + ["handshake admitted"]
    else:
        assert outcomes == ["limits_store_unavailable"] * 3 + ["handshake 503"]
    assert errors >= 4
    # One line of the gateway's for the outage, not one per response (the lines shown if not).
    assert [line for line in log.splitlines() if "ai-gateway: limits store" in line][1:] == []
