"""scripts/serve, the production launcher, as real processes on loopback: what only it does.

The end-to-end tests run against it too (the `gateway` fixture is parametrized over both
launchers); here: its startup errors and shutdown, HTTP metering, and `--workers`: the kernel
spreads connections over the workers, one /metrics adds them up exactly, and a worker killed
with SIGKILL is restarted while what it counted stays counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import websockets
from openai import OpenAI
from websockets.asyncio.client import ClientConnection

from ai_gateway_tools.bench.serve import CONFIGS
from ai_gateway_tools.bench.serve import main as launcher_bench
from ai_gateway_tools.harness import GatewayProcess, expected_samples, scrape, select, usage_only
from ai_gateway_tools.simulators.http import HttpSimulator
from ai_gateway_tools.simulators.realtime import Simulator, SimulatorThread

from ..clients import respond, wait_until, websocket_base

WORKERS = ["--workers", "2"]
MESSAGES = [{"role": "user", "content": "hi"}]
UPSTREAM = ["--mode", "reverse:http://127.0.0.1:9"]
MODEL_LABELS = {"gen_ai_request_model", "gen_ai_response_model"}
SESSIONS = "agentgateway_gateway_websocket_sessions"
CONNECTED = re.compile(r"^\[worker (\d+) pid (\d+)\] .*\]\[127\.0\.0\.1:(\d+)\] client connect$", re.MULTILINE)
SERVING = re.compile(r"ai-gateway: worker (\d+) serving \(pid (\d+)\)")
POLICY_ERROR = (
    "policy.yaml:2: routes./realtime: expected one of Completions, Responses, Embeddings, Realtime, Passthrough, TextCompletions, Transcriptions, Translations, Speech, Images, RealtimeCalls, "
    "got 'Realtim'"
)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Simulator]:
    with SimulatorThread(seed=88, audio_deltas=2, transcript_deltas=2) as sim:
        yield sim


def serve(upstream_url: str, *args: str, **options: str) -> GatewayProcess:
    return GatewayProcess(upstream_url, launcher="serve", args=args, options=options)


def environment(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


def worker_pids(gateway: GatewayProcess) -> dict[int, int]:
    """The current pid of each worker slot, from the supervisor's log."""
    return {int(slot): int(pid) for slot, pid in SERVING.findall(gateway.log())}


def successor(gateway: GatewayProcess, slot: int, dead: int) -> int | None:
    """The pid serving `slot` once it is no longer `dead`."""
    pid = worker_pids(gateway)[slot]
    return None if pid == dead else pid


def connection_pid(gateway: GatewayProcess, port: int, since: int) -> int | None:
    """The pid of the worker that logged accepting client `port` after log offset `since`
    (ephemeral ports are reused, so earlier lines may name an earlier connection)."""
    for _, pid, logged_port in CONNECTED.findall(gateway.log()[since:]):
        if int(logged_port) == port:
            return int(pid)
    return None


def realtime_url(gateway: GatewayProcess, model: str) -> str:
    return f"{websocket_base(gateway.url)}/v1/realtime?model={model}"


async def one_session(gateway: GatewayProcess, model: str) -> None:
    async with websockets.connect(realtime_url(gateway, model)) as ws:
        await respond(ws)


async def open_session(gateway: GatewayProcess, model: str) -> tuple[ClientConnection, int]:
    """A session with one finished response, and the worker pid that holds it."""
    since = len(gateway.log())
    ws = await websockets.connect(realtime_url(gateway, model))
    await respond(ws)
    port = ws.local_address[1]
    pid = await asyncio.to_thread(wait_until, lambda: connection_pid(gateway, port, since))
    return ws, pid


async def sessions_until(
    gateway: GatewayProcess, model: str, done: Callable[[set[int]], bool], most: int = 40
) -> list[tuple[ClientConnection, int]]:
    """Opens sessions until the set of worker pids holding them satisfies `done`.

    The kernel picks the worker by a hash of the connection, so a few sessions reach every worker
    (all of 40 on one of two workers: 2^-39).
    """
    sessions: list[tuple[ClientConnection, int]] = []
    while not done({pid for _, pid in sessions}):
        assert len(sessions) < most, f"{most} sessions reached only workers { ({pid for _, pid in sessions}) }"
        sessions.append(await open_session(gateway, model))
    return sessions


def open_sessions_gauge(gateway: GatewayProcess) -> float:
    return sum(v for (name, _), v in scrape(gateway.metrics_url).items() if name == SESSIONS)


def assert_exact(gateway: GatewayProcess, simulator: Simulator, model: str) -> None:
    sent = simulator.usage_for(model)
    assert sent
    assert usage_only(select(scrape(gateway.metrics_url), gen_ai_request_model=model)) == expected_samples(sent)


@pytest.mark.slow
@pytest.mark.parametrize("args", [[], WORKERS], ids=["one", "workers"])
def test_invalid_policy_stops_startup_with_one_line(tmp_path, args):
    path = tmp_path / "policy.yaml"
    path.write_text("routes:\n  /realtime: Realtim\n")
    returncode, output = serve("http://127.0.0.1:9", *args, gateway_policy=str(path)).run_until_exit()
    assert returncode != 0
    assert POLICY_ERROR in output
    assert "Traceback" not in output
    assert sum("policy.yaml" in line for line in output.splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("args", [[], WORKERS], ids=["one", "workers"])
def test_metrics_port_in_use_is_one_clear_error(args):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        returncode, output = serve("http://127.0.0.1:9", *args, gateway_metrics_port=str(port)).run_until_exit()
    assert returncode != 0
    assert f"ai-gateway: cannot serve metrics on 127.0.0.1:{port}: Address already in use" in output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*UPSTREAM, "--set", "flow_detail=2"], "serve: Unknown option(s): flow_detail"),
        ([], "serve: --mode regular: serve runs reverse gateways only (reverse:URL[@PORT])"),
        ([*UPSTREAM, "-p", "0", *WORKERS], "serve: --workers needs a fixed listen port, not 0"),
    ],
    ids=["mitmdump-only option", "no reverse mode", "workers on port 0"],
)
def test_what_serve_does_not_run_is_refused_in_one_line(args, message):
    result = subprocess.run(
        [sys.executable, "-m", "ai_gateway.launcher.serve", *args], capture_output=True, text=True, timeout=30
    )
    assert (result.returncode, result.stdout + result.stderr) == (1, message + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("args", [[], WORKERS], ids=["one", "workers"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_every_process_cleanly(upstream, args, sig):
    gateway = serve(upstream.url, *args).start()
    assert gateway.process is not None
    pids = list(worker_pids(gateway).values())
    directories = {Path(environment(pid)["PROMETHEUS_MULTIPROC_DIR"]) for pid in pids}
    gateway.process.send_signal(sig)
    assert gateway.process.wait(15) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", gateway.metrics_port))  # `done` stopped the metrics server
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert not [d for d in directories if d.exists()]


def test_logs_go_to_stdout_as_mitmdumps_do(upstream):
    """Without metrics the harness waits for mitmproxy's listening line: it is there. -q keeps errors only."""
    with serve(upstream.url, gateway_metrics_port="0") as gateway:
        pass
    log = gateway.log()
    assert re.search(r"^\[[\d:.]+\] ai-gateway: policy .*openai\.yaml \(\d+ routes\)$", log, re.MULTILINE)
    assert re.search(
        rf"^\[[\d:.]+\] reverse proxy to .* listening at 127\.0\.0\.1:{gateway.port}\.$", log, re.MULTILINE
    )
    with serve(upstream.url, "-q") as quiet:
        pass
    assert quiet.log() == ""


def test_http_routes_are_metered_exactly(model):
    with SimulatorThread(server=HttpSimulator(seed=7)) as simulator, serve(simulator.url) as gateway:
        client = OpenAI(api_key="sk-client", base_url=f"{gateway.url}/v1", max_retries=0)
        client.chat.completions.create(model=model, messages=MESSAGES)
        assert list(client.chat.completions.create(model=model, messages=MESSAGES, stream=True))[-1].usage is not None
        client.embeddings.create(model=model, input="hi")
        sent = simulator.usage_for(model)
        assert len(sent) == 3
        assert usage_only(select(scrape(gateway.metrics_url), gen_ai_request_model=model)) == expected_samples(sent)


@pytest.mark.slow
def test_workers_share_the_port_and_one_endpoint_counts_exactly(upstream, model, tmp_path):
    ledger = tmp_path / "usage.jsonl"
    with serve(upstream.url, *WORKERS, gateway_usage_log=str(ledger)) as gateway:

        async def drive() -> None:
            sessions = await sessions_until(gateway, model, lambda pids: len(pids) == 2)
            assert open_sessions_gauge(gateway) == len(sessions)
            await asyncio.gather(*(respond(ws, 2) for ws, _ in sessions))
            for ws, _ in sessions:
                await ws.close()

        asyncio.run(drive())
        assert_exact(gateway, upstream, model)
        wait_until(lambda: open_sessions_gauge(gateway) == 0)
        workers_samples = scrape(gateway.metrics_url)
    lines = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert len(lines) == len(upstream.usage_for(model))  # both workers append whole lines to one ledger

    with serve(upstream.url) as single:
        asyncio.run(one_session(single, f"{model}-single"))
        single_samples = scrape(single.metrics_url)

    def series(samples: dict, request_model: str) -> set:
        """Every name and label set of the model's series, model labels left out."""
        return {
            (name, frozenset((k, v) for k, v in labels if k not in MODEL_LABELS))
            for name, labels in select(samples, gen_ai_request_model=request_model)
        }

    assert series(workers_samples, model) == series(single_samples, f"{model}-single")
    assert {name for name, _ in workers_samples} == {name for name, _ in single_samples}


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_what_it_counted_stays(upstream, model):
    with serve(upstream.url, *WORKERS) as gateway:

        async def drive() -> None:
            sessions = await sessions_until(gateway, model, lambda pids: len(pids) == 2)
            victim = sessions[0][1]
            slot = next(slot for slot, pid in worker_pids(gateway).items() if pid == victim)
            doomed = [ws for ws, pid in sessions if pid == victim]
            survivors = [ws for ws, pid in sessions if pid != victim]
            # Sessions on the other worker keep going while the victim is killed (its own sessions are idle,
            # so every response the upstream ledgered has been counted).
            going_on = asyncio.gather(*(respond(ws, 3) for ws in survivors))
            os.kill(victim, signal.SIGKILL)
            await going_on
            for ws in doomed:
                await asyncio.wait_for(ws.wait_closed(), 15)
            restarted = await asyncio.to_thread(wait_until, lambda: successor(gateway, slot, victim))
            newcomers = await sessions_until(gateway, model, lambda pids: restarted in pids)
            await respond(newcomers[-1][0], 2)
            # Live gauges of the dead worker are gone: the open sessions are the survivors and newcomers.
            assert open_sessions_gauge(gateway) == len(survivors) + len(newcomers)
            for ws in [*survivors, *(ws for ws, _ in newcomers)]:
                await ws.close()

        asyncio.run(drive())
        assert_exact(gateway, upstream, model)
    assert re.search(r"ai-gateway: worker \d \(pid \d+\) was killed by SIGKILL; restarting$", gateway.log(), re.M)


@pytest.mark.slow
def test_the_launcher_benchmark_runs_and_checks_its_accounting():
    """A tiny run of `python -m ai_gateway_tools.bench.serve`, for its plumbing only: no timing is asserted
    (it raises if a gateway's /metrics disagree with the simulator's ledger). Run in the worker (its
    `main`), so that its gateways are forked; its `--workers` children are started as commands."""
    tiny = ["--sessions", "2", "--responses", "1", "--rounds", "1", "--dispatch-messages", "500"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        launcher_bench(tiny)
    report = json.loads(printed.getvalue())
    assert set(report["summary"]) == set(CONFIGS)
    assert {"time_vs_mitmdump", "cpu_vs_mitmdump"} <= set(report["summary"]["serve"])
    assert len(report["rss_idle_mb_per_process"]["serve-workers2"]) == 3  # the supervisor and two workers
    assert len(report["dispatch_us_per_message"]) == 3
