"""Guard services asked over pooled connections (accounting/guard_service.py), against the guard
simulator on loopback: a connection kept for call after call, moderation checks batched, and
every failure a verdict."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from ai_gateway.accounting import guard_service
from ai_gateway.accounting.guard_service import MAX_ANSWER_BYTES, SHUTTING_DOWN, GuardClients, prepare
from ai_gateway.config.guardrails import ALLOW, ERROR, Action, Phase, Verdict
from ai_gateway.proxy.guard_checks import GuardChecks, asker
from ai_gateway_tools.simulators.guard import GuardSimulator

from .conftest import configured_gateway, sample_total
from .test_addon import realtime_flow
from .test_guardrails import guards


def webhook(url: str, timeout_ms: int = 2000, on_error: str = "open"):
    text = f"guardrails:\n  - {{name: w, kind: webhook, url: {url}, timeout_ms: {timeout_ms}, on_error: {on_error}}}\n"
    return guards(text)[0]


def asked(url: str, texts: list[str], **guard: object) -> list:
    """The verdicts on `texts`, asked one after the other by one client, closed at the end."""

    async def ask_all() -> list:
        clients = GuardClients()
        try:
            return [await clients.ask(webhook(url, **guard), text, {"phase": "input"}) for text in texts]
        finally:
            await clients.close()

    return asyncio.run(ask_all())


def test_calls_reuse_one_kept_alive_connection_and_give_the_services_verdicts():
    with GuardSimulator() as service:
        verdicts = asked(f"{service.url}/webhook", ["hello", "project falcon", "weather?", "PROJECT FALCON", "bye"])
        assert [v.outcome for v in verdicts] == [ALLOW, Action.BLOCK, ALLOW, Action.BLOCK, ALLOW]
        assert verdicts[1].reason == "denied phrase"
        assert [body["text"] for _, body in service.requests] == ["hello", "project falcon", "weather?", "PROJECT FALCON", "bye"]  # fmt: skip
        assert service.connections == 1


def test_a_slow_service_is_an_error_verdict_at_the_guards_timeout():
    with GuardSimulator(delay=2.0) as service:
        began = time.monotonic()
        (verdict,) = asked(f"{service.url}/webhook", ["hello"], timeout_ms=200, on_error="closed")
        assert time.monotonic() - began < 1.5
        assert (verdict.outcome, verdict.reason, verdict.blocks) == (ERROR, "timeout", True)


def test_a_non_2xx_answer_is_an_error_verdict():
    with GuardSimulator() as service:
        (verdict,) = asked(f"{service.url}/nowhere", ["hello"])
        assert (verdict.outcome, verdict.reason, verdict.blocks) == (ERROR, "ServiceError: HTTP 404", False)


def test_an_oversized_answer_is_an_error_verdict():
    with GuardSimulator(padding=MAX_ANSWER_BYTES) as service:
        (verdict,) = asked(f"{service.url}/webhook", ["hello"])
        assert (verdict.outcome, verdict.reason) == (ERROR, "ServiceError: answer too large")


def test_a_dead_port_is_an_error_verdict():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: connections are refused
        (verdict,) = asked(f"http://127.0.0.1:{port}/webhook", ["hello"])
    assert verdict.outcome == ERROR and verdict.reason.startswith("ClientConnectorError")


def test_a_service_that_keeps_failing_is_paused_then_tried_again(monkeypatch, caplog):
    """Three calls time out: the service is paused, its next checks an error verdict at once with no
    request sent; once the pause ends one call tries it again (failing: paused twice as long), and
    the first answer ends it, for webhook and moderation guards alike."""
    monkeypatch.setattr(guard_service, "FIRST_PAUSE_SECONDS", 0.3)
    with GuardSimulator(delay=1.0) as service:
        kinds = [webhook(f"{service.url}/webhook", timeout_ms=100), moderation(f"{service.url}/v1/moderations", timeout_ms=100)]  # fmt: skip

        async def check(clients: GuardClients, guard) -> tuple[Verdict, float]:
            began = time.monotonic()
            return await clients.ask(guard, "hello", {}, held=True), time.monotonic() - began

        async def pause_and_resume(guard) -> None:
            clients = GuardClients()
            try:
                for _ in range(3):
                    assert (await check(clients, guard))[0].reason == "timeout"
                sent = len(service.requests)
                (verdict, took), _ = await check(clients, guard), await check(clients, guard)
                assert (verdict.outcome, verdict.reason) == (ERROR, "not asked: the service failed its last 3 calls")
                assert took < 0.05 and len(service.requests) == sent and not clients.batches
                while clients.paused(guard):
                    await asyncio.sleep(0.02)
                assert (await check(clients, guard))[0].reason == "timeout"  # tried again, failed
                assert len(service.requests) == sent + 1 and clients.health[guard].pause == 0.6
                service.delay = 0.0
                while clients.paused(guard):
                    await asyncio.sleep(0.02)
                assert [(await check(clients, guard))[0].outcome for _ in range(2)] == [ALLOW, ALLOW]
                assert guard not in clients.health
            finally:
                service.delay = 1.0
                await clients.close()

        with caplog.at_level(logging.INFO, logger=guard_service.__name__):
            for guard in kinds:
                run_cleanly(lambda: pause_and_resume(guard))  # noqa: B023 (run at once)
    said = [r.getMessage() for r in caplog.records]
    assert sum("failed 3 calls in a row (the last: timeout); not asked for 0.3 s" in m for m in said) == 2
    assert sum("failed 4 calls in a row (the last: timeout); not asked for 0.6 s" in m for m in said) == 2
    assert sum(m.endswith("its service answers again") for m in said) == 2


def test_a_policy_with_a_service_guard_imports_the_client_when_applied(tmp_path):
    """Not in the first check (its import would eat the guard's timeout), not without a service guard."""
    policy = tmp_path / "services.yaml"
    policy.write_text(
        "guardrails:\n  - {name: w, kind: webhook, url: http://127.0.0.1:9/webhook}\nroutes:\n  /realtime: Realtime\n"
    )
    code = (
        "import sys\nfrom mitmproxy.test import taddons\nfrom ai_gateway.proxy.addon import Gateway\n"
        "gateway = Gateway()\nwith taddons.context(gateway) as context:\n"
        "    for policy in sys.argv[1:]:\n"
        "        context.configure(gateway, gateway_metrics_port=0, gateway_policy=policy)\n"
        "        print('aiohttp', 'aiohttp' in sys.modules)\n"
    )
    regex = tmp_path / "regex.yaml"
    regex.write_text("guardrails:\n  - {name: r, kind: regex, deny: [falcon]}\nroutes:\n  /realtime: Realtime\n")
    # One process: the regex policy applied first, then the one with a service guard.
    run = subprocess.run([sys.executable, "-c", code, str(regex), str(policy)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    loaded = [line.split()[1] for line in run.stdout.splitlines() if line.startswith("aiohttp ")]
    assert loaded == ["False", "True"]


def moderation(url: str, **keys: object):
    """A moderation guard on `url` with these keys (batch_ms, batch_max, timeout_ms, on_error)."""
    extra = "".join(f", {k}: {v}" for k, v in keys.items())
    return guards(f"guardrails:\n  - {{name: m, kind: moderation, url: {url}{extra}}}\n")[0]


def run_cleanly[T](main: Callable[[], Awaitable[T]]) -> T:
    """asyncio.run(main()), failing on the loop's unhandled errors (a task destroyed pending...)."""

    async def checked() -> T:
        problems: list[dict] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, context: problems.append(context))
        result = await main()
        assert not problems
        return result

    return asyncio.run(checked())


def batched(guard, asks: list[tuple[str, bool]]) -> tuple[list, float]:
    """The verdicts on (text, held) asks, made concurrently in that order by one client (closed
    after), and the seconds they took."""

    async def ask_all() -> tuple[list, float]:
        clients = GuardClients()
        began = time.monotonic()
        try:
            verdicts = await asyncio.gather(*(clients.ask(guard, text, {}, held) for text, held in asks))
            return verdicts, time.monotonic() - began
        finally:
            await clients.close()

    return run_cleanly(ask_all)


def inputs(service: GuardSimulator) -> list:
    return [body["input"] for path, body in service.requests if path == "/v1/moderations"]


def test_checks_nothing_waits_for_share_one_request_and_get_their_own_verdicts():
    with GuardSimulator() as service:
        guard = moderation(f"{service.url}/v1/moderations", batch_ms=100)
        asks = [("hello", False), ("project falcon", False), ("weather?", False)]
        verdicts, _ = batched(guard, asks)
        assert [v.outcome for v in verdicts] == [ALLOW, Action.BLOCK, ALLOW]
        assert inputs(service) == [["hello", "project falcon", "weather?"]]


def test_a_full_batch_goes_without_lingering():
    with GuardSimulator() as service:
        guard = moderation(f"{service.url}/v1/moderations", batch_ms=5000, timeout_ms=10000, batch_max=2)
        verdicts, took = batched(guard, [("a", False), ("b", False), ("project falcon", False), ("d", False)])
        assert took < 2.5 and [v.outcome for v in verdicts] == [ALLOW, ALLOW, Action.BLOCK, ALLOW]
        # Two requests at once, on two connections: the service may take either first.
        assert sorted(inputs(service)) == [["a", "b"], ["project falcon", "d"]]


def test_a_held_check_goes_at_once_taking_the_queued_ones_along():
    with GuardSimulator() as service:
        guard = moderation(f"{service.url}/v1/moderations", batch_ms=5000, timeout_ms=10000)
        verdicts, took = batched(guard, [("project falcon", False), ("b", False), ("held", True)])
        assert took < 2.5 and [v.outcome for v in verdicts] == [Action.BLOCK, ALLOW, ALLOW]
        assert inputs(service) == [["project falcon", "b", "held"]]


def test_without_batching_each_check_is_its_own_request_of_one_string():
    with GuardSimulator() as service:
        verdicts, _ = batched(moderation(f"{service.url}/v1/moderations", batch_ms=0), [("a", False), ("b", False)])
        assert [v.outcome for v in verdicts] == [ALLOW, ALLOW]
        assert sorted(inputs(service)) == ["a", "b"]


def test_the_wait_for_a_batch_counts_against_each_checks_timeout():
    """A held check is answered within the timeout; one that lingered 300 ms first is not; one that
    times out while lingering is left out of the request (no one waits for it)."""
    prepare()  # aiohttp imported before the first check is timed, as when a policy is applied
    with GuardSimulator(delay=0.3) as service:
        guard = moderation(f"{service.url}/v1/moderations", batch_ms=300, timeout_ms=500, on_error="closed")
        (held,), _ = batched(guard, [("first", True)])
        (lingered,), took = batched(guard, [("second", False)])
        assert held.outcome == ALLOW
        assert (lingered.outcome, lingered.reason, lingered.blocks) == (ERROR, "timeout", True) and took < 1.5
        assert inputs(service) == ["first", "second"]

        async def late() -> Verdict:
            """Lingering past the timeout (not a policy the validator takes): the text is never sent."""
            clients = GuardClients()
            verdict = await clients.ask(replace(guard, batch_ms=1000), "third", {})
            while clients.batches:  # until its batch's time came, with no one left waiting in it
                await asyncio.sleep(0.05)
            await clients.close()
            return verdict

        verdict = run_cleanly(late)
        assert (verdict.outcome, verdict.reason) == (ERROR, "timeout")
        assert inputs(service) == ["first", "second"]


def test_a_failed_batch_is_an_error_verdict_for_every_check_in_it():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = moderation(f"http://127.0.0.1:{unused.getsockname()[1]}/v1/moderations", on_error="closed")
        verdicts, _ = batched(dead, [("a", False), ("b", False), ("c", False)])
    assert [(v.outcome, v.blocks) for v in verdicts] == [(ERROR, True)] * 3
    assert all(v.reason.startswith("ClientConnectorError") for v in verdicts)
    with GuardSimulator() as service:
        verdicts, _ = batched(moderation(f"{service.url}/nowhere"), [("a", False), ("b", True)])
    assert [(v.outcome, v.reason, v.blocks) for v in verdicts] == [(ERROR, "ServiceError: HTTP 404", False)] * 2


def test_closing_ends_lingering_and_sent_batches_with_error_verdicts():
    """At shutdown, nothing is left pending: each asker gets a verdict, no task is destroyed pending."""
    with GuardSimulator(delay=2.0) as service:
        guard = moderation(f"{service.url}/v1/moderations", batch_ms=4000, timeout_ms=10000)
        other = moderation(f"{service.url}/v1/moderations", timeout_ms=10000)  # another guard, its request sent

        async def closed() -> list:
            clients = GuardClients()
            asks = [asyncio.ensure_future(clients.ask(g, "x", {}, held)) for g, held in ((guard, False), (other, True))]
            while not (clients.sending and clients.batches):  # one batch lingering, one request in flight
                await asyncio.sleep(0.01)
            await clients.close()
            return await asyncio.gather(*asks)

        began = time.monotonic()
        verdicts = run_cleanly(closed)
        assert time.monotonic() - began < 1.5
        assert [(v.outcome, v.reason) for v in verdicts] == [(ERROR, SHUTTING_DOWN)] * 2


def test_text_the_relay_holds_takes_the_lingering_output_checks_along(tmp_path):
    """GuardChecks: windows of output (`ask_later`) linger; a user's text (`decide`, held) goes at once
    with them, and each check is counted and timed on its own, from its ask to its verdict."""
    with GuardSimulator() as service:
        policy = tmp_path / "guarded.yaml"
        policy.write_text(
            f"guardrails:\n  - {{name: m, kind: moderation, url: {service.url}/v1/moderations, "
            "batch_ms: 5000, timeout_ms: 10000}\nroutes:\n  /realtime: Realtime\n"
        )
        with configured_gateway(gateway_policy=str(policy)) as gateway:
            flow = realtime_flow()
            (guard,) = gateway.state.policy.guardrails.guards
            refused: list[Verdict] = []

            async def checked() -> float:
                checks = GuardChecks(gateway.state)
                session = asker(flow, "/realtime")
                began = time.monotonic()
                later: list[list[Verdict]] = []
                for text in ("project falcon", "fine"):  # as a stream's windows are asked
                    checks.ask_later(session, [guard], Phase.OUTPUT, text, later.append)
                await checks.decide(flow, session, [guard], Phase.INPUT, "hello", refused.append)
                while len(later) < 2:
                    await asyncio.sleep(0.01)
                await checks.shutdown()
                return time.monotonic() - began

            took = run_cleanly(checked)
            metrics = gateway.state.accounting.metrics
            counted = {
                outcome: sample_total(metrics, "agentgateway_guardrail_checks_total", guard="m", action=outcome)
                for outcome in ("allow", "block")
            }
            timed = sample_total(metrics, "agentgateway_guardrail_check_duration_seconds_count", guard="m")
    assert took < 2.5 and not refused
    assert inputs(service) == [["project falcon", "fine", "hello"]]
    assert (counted, timed) == ({"allow": 2, "block": 1}, 3)


def test_checks_asked_later_hand_their_verdicts_over_in_order_and_are_dropped_at_shutdown(tmp_path):
    """GuardChecks.ask_later: a webhook (a task) and a moderation guard (its batch's future) on one
    text, their verdicts handed over once both are in, in the guards' order, each counted; asked
    again while the service is slow, shutdown ends them without acting on or counting them."""
    with GuardSimulator() as service, GuardSimulator(delay=2.0) as slow:
        policy = tmp_path / "guarded.yaml"
        policy.write_text(
            "guardrails:\n"
            f"  - {{name: w, kind: webhook, url: {service.url}/webhook}}\n"
            f"  - {{name: m, kind: moderation, url: {service.url}/v1/moderations, batch_ms: 20}}\n"
            "routes:\n  /realtime: Realtime\n"
        )
        with configured_gateway(gateway_policy=str(policy)) as gateway:
            both = gateway.state.policy.guardrails.guards
            stalled = [replace(g, url=g.url.replace(service.url, slow.url)) for g in both]  # type: ignore[union-attr]
            handed: list[list[Verdict]] = []

            async def checked() -> None:
                checks = GuardChecks(gateway.state)
                session = asker(realtime_flow(), "/realtime")
                checks.ask_later(session, both, Phase.OUTPUT, "project falcon", handed.append)
                while not handed:
                    await asyncio.sleep(0.01)
                checks.ask_later(session, stalled, Phase.OUTPUT, "fine", handed.append)
                while not (checks.clients.sending and checks.clients.calls):  # both calls in flight
                    await asyncio.sleep(0.01)
                await checks.shutdown()
                assert session.pending == 0

            run_cleanly(checked)
            metrics = gateway.state.accounting.metrics
            counted = sample_total(metrics, "agentgateway_guardrail_checks_total")
    assert [[(v.guard, v.outcome) for v in verdicts] for verdicts in handed] == [[("w", "block"), ("m", "block")]]
    assert counted == 2


def test_a_call_that_ends_in_an_exception_is_an_error_verdict_handed_over(tmp_path, caplog):
    """The clients make every failure a verdict; were a call to end otherwise (a bug), its check is
    still answered (an error, logged) rather than left hanging with its text's other verdicts."""
    policy = tmp_path / "guarded.yaml"
    policy.write_text(
        "guardrails:\n  - {name: w, kind: webhook, url: http://127.0.0.1:9/webhook}\nroutes:\n  /realtime: Realtime\n"
    )
    with configured_gateway(gateway_policy=str(policy)) as gateway:
        (guard,) = gateway.state.policy.guardrails.guards
        handed: list[list[Verdict]] = []

        async def checked() -> None:
            checks = GuardChecks(gateway.state)

            def broken(*_: object) -> asyncio.Future[Verdict]:
                call: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
                call.set_exception(RuntimeError("boom"))
                return call

            checks.clients.soon = broken  # type: ignore[method-assign]
            checks.ask_later(asker(realtime_flow(), "/realtime"), [guard], Phase.OUTPUT, "hello", handed.append)
            while not handed:
                await asyncio.sleep(0.01)

        run_cleanly(checked)
    assert [[(v.guard, v.outcome, v.reason) for v in verdicts] for verdicts in handed] == [
        [("w", ERROR, "RuntimeError: boom")]
    ]
    assert "a guardrail check failed: RuntimeError('boom')" in caplog.text
