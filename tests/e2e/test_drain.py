"""Graceful drain on SIGTERM: 40 Realtime sessions open, the signal mid-run, on the real gateway."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import signal
import socket
import time

import pytest
import websockets

from ai_gateway_tools.harness import GatewayProcess, scrape, select
from ai_gateway_tools.simulators.http import HttpSimulator
from ai_gateway_tools.simulators.realtime import SimulatorThread

from ..clients import respond, wait_until, websocket_base

DRAIN_SECONDS = 4
SESSIONS = 40


class Client:
    """A session creating responses one after another until told to stop; it then stays open, idle."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.finished: list[tuple[str, float]] = []  # response id, when the client saw it finish
        self.closed_at: float | None = None
        self.stop = asyncio.Event()
        self.idle = asyncio.Event()
        self.leave = asyncio.Event()

    async def run(self) -> None:
        async with websockets.connect(self.url, max_size=None) as ws:
            try:
                while not self.stop.is_set():
                    event = await respond(ws)
                    self.finished.append((event["response"]["id"], time.monotonic()))
                self.idle.set()
                leave = asyncio.ensure_future(self.leave.wait())
                await asyncio.wait(
                    [leave, asyncio.ensure_future(ws.wait_closed())], return_when=asyncio.FIRST_COMPLETED
                )
                leave.cancel()
            except websockets.ConnectionClosed:
                pass
            if ws.state is websockets.State.CLOSED and not self.leave.is_set():
                self.closed_at = time.monotonic()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize(
    ("launcher", "args"),
    [("mitmdump", []), ("serve", []), ("serve", ["--workers", "2"])],
    ids=["mitmdump", "serve", "serve-workers"],
)
@pytest.mark.slow
def test_sigterm_drains_open_sessions_and_every_finished_response_is_in_the_ledger(tmp_path, launcher, args):
    drain_sessions(tmp_path, launcher, args)


def drain_sessions(tmp_path, launcher: str, args: list[str]) -> str:
    """SESSIONS sessions drained by SIGTERM, checked; the gateway's log."""
    ledger = tmp_path / "usage.jsonl"
    options = {"gateway_usage_log": str(ledger), "gateway_drain_seconds": str(DRAIN_SECONDS)}
    with (
        SimulatorThread(audio_deltas=2, transcript_deltas=2) as simulator,
        GatewayProcess(simulator.url, options=options, launcher=launcher, args=args) as gateway,
    ):
        assert gateway.process is not None
        url = f"{websocket_base(gateway.url)}/v1/realtime?model=gpt-realtime-drain"
        clients = [Client(url) for _ in range(SESSIONS)]

        async def run() -> tuple[float, bool, dict, float]:
            tasks = [asyncio.ensure_future(c.run()) for c in clients]
            while sum(len(c.finished) for c in clients) < 200:
                await asyncio.sleep(0.01)
            assert gateway.process is not None
            gateway.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.sleep(1.0)  # the sessions keep working through the drain
            new_connection_refused = await asyncio.to_thread(refused, gateway.port)
            for c in clients:
                c.stop.set()
            # Every session finishes its response in flight, then idles: /metrics still answers.
            await asyncio.wait_for(asyncio.gather(*(c.idle.wait() for c in clients)), DRAIN_SECONDS)
            samples = await asyncio.to_thread(scrape, gateway.metrics_url)
            for c in clients[1:]:  # all but one leave; the last one is closed at the deadline
                c.leave.set()
            await asyncio.gather(*tasks)
            exited = await asyncio.to_thread(gateway.process.wait, DRAIN_SECONDS + 10)
            assert exited == 0, gateway.log()
            return signalled, new_connection_refused, samples, time.monotonic()

        signalled, new_connection_refused, samples, exited_at = asyncio.run(asyncio.wait_for(run(), 60))
    finished = [response_id for c in clients for response_id, _ in c.finished]
    after_signal = sum(1 for c in clients for _, seen in c.finished if seen > signalled)
    records = [json.loads(line) for line in ledger.read_text().splitlines()]
    ids = [r["response_id"] for r in records]
    print(
        f"\n{gateway.name} {' '.join(args)}: {len(finished)} responses finished, {after_signal} of them after "
        f"SIGTERM; ledger {len(ids)} lines; exit {exited_at - signalled:.2f} s after SIGTERM"
    )
    assert after_signal >= SESSIONS, "the sessions kept working during the drain"
    assert new_connection_refused, "new connections are refused while draining"
    assert len(ids) == len(set(ids)) and set(finished) <= set(ids), "every response a client saw finish is recorded"
    responses = select(samples, gen_ai_request_model="gpt-realtime-drain")
    counted = sum(v for (name, _), v in responses.items() if name == "agentgateway_gen_ai_client_responses_total")
    assert counted == len(finished) == len(ids) == len(simulator.ledger)
    assert clients[0].closed_at is not None and clients[0].closed_at - signalled >= DRAIN_SECONDS - 0.5
    assert exited_at - signalled < DRAIN_SECONDS + 3, "the process exits within the drain deadline"
    return gateway.log()


def chat(connection: http.client.HTTPConnection, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    """A Chat Completions request on a kept-alive HTTP/1.1 connection: status, connection header, body."""
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    connection.request("POST", "/v1/chat/completions", body, {"content-type": "application/json", **(headers or {})})
    response = connection.getresponse()
    return response.status, response.headers.get("connection", ""), response.read()


def test_sigterm_lets_a_slow_http_request_finish_and_does_not_wait_for_idle_keep_alive_connections(tmp_path):
    ledger = tmp_path / "usage.jsonl"
    drain = 10
    options = {"gateway_usage_log": str(ledger), "gateway_drain_seconds": str(drain)}
    with (
        SimulatorThread(server=HttpSimulator(seed=4)) as simulator,
        GatewayProcess(simulator.url, options=options, launcher="serve") as gateway,
    ):
        assert gateway.process is not None
        idle = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
        slow = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
        assert chat(idle)[0] == 200  # its connection stays open, idle
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(chat, slow, {"x-sim-delay-ms": "2000"})
            wait_until(lambda: len(simulator.requests) == 2)
            signalled = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)
            status, connection_header, _ = pending.result()
        assert gateway.process.wait(drain + 5) == 0
        exited = time.monotonic() - signalled
    assert status == 200 and connection_header == "close"
    records = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [r["output_tokens"] for r in records] == [e.usage["completion_tokens"] for e in simulator.ledger]
    assert len(records) == 2
    print(f"\nslow request finished during the drain; exit {exited:.2f} s after SIGTERM")
    # The slow response takes 2 s; shutting down takes about 2 s more on this machine (without a drain too).
    assert exited < drain - 3, "the idle keep-alive connection did not hold the drain to its deadline"
