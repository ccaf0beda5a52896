"""Guard services asked over pooled connections (accounting/guard_service.py), against the guard
simulator on loopback: a connection kept for call after call, and every failure a verdict."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

from ai_gateway.accounting.guard_service import MAX_ANSWER_BYTES, GuardClients
from ai_gateway.config.guardrails import ALLOW, ERROR, Action
from ai_gateway_tools.simulators.guard import GuardSimulator

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


def test_a_policy_with_a_service_guard_imports_the_client_when_applied(tmp_path):
    """Not in the first check (its import would eat the guard's timeout), not without a service guard."""
    policy = tmp_path / "services.yaml"
    policy.write_text(
        "guardrails:\n  - {name: w, kind: webhook, url: http://127.0.0.1:9/webhook}\nroutes:\n  /realtime: Realtime\n"
    )
    code = (
        "import sys\nfrom mitmproxy.test import taddons\nfrom ai_gateway.proxy.addon import Gateway\n"
        "gateway = Gateway()\nwith taddons.context(gateway) as context:\n"
        "    context.configure(gateway, gateway_metrics_port=0, gateway_policy=sys.argv[1])\n"
        "    print('aiohttp' in sys.modules)\n"
    )
    regex = tmp_path / "regex.yaml"
    regex.write_text("guardrails:\n  - {name: r, kind: regex, deny: [falcon]}\nroutes:\n  /realtime: Realtime\n")
    loaded = [
        subprocess.run(
            [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
        ).stdout.split()[-1]
        for path in (regex, policy)
    ]
    assert loaded == ["False", "True"]
