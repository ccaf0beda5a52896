"""`scripts/serve --workers N`: N gateway processes behind one port and one /metrics endpoint.

Balancing is the kernel's: every worker binds the gateway's port with SO_REUSEPORT (its event
loop does, `serve.ReusePort`) and Linux hands each new connection to one of them; a WebSocket
session stays on the worker that accepted it.

Metrics use prometheus_client's multiprocess mode. Each worker starts with
PROMETHEUS_MULTIPROC_DIR in its environment, so prometheus_client (imported after) keeps every
value in memory-mapped files in that directory, whichever registry the gateway defines its
metrics on, and the worker serves no /metrics of its own. This supervisor serves the sum of
all files on the usual endpoint, with the same names and labels as a single gateway (gauges
declare a multiprocess_mode in metrics.py, or a `pid` label would appear). A worker that dies
is restarted; its counters stay in its files, so totals stay exact, and its live gauges (open
sessions) are dropped with `mark_process_dead`.

State kept in memory stays per worker: client-key budgets are enforced by each worker on the
sessions it holds, and `gateway_max_model_labels` and `gateway_max_series_per_family` bound each
worker's label values and series.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mitmproxy import exceptions
from mitmproxy.options import Options
from mitmproxy.proxy import mode_specs
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from ai_gateway.accounting.metrics import MetricsServer
from ai_gateway.proxy.metrics_endpoint import is_loopback

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
RESTART_DELAY = 1.0  # seconds before restarting a worker that died before serving: no tight crash loop
STOP_TIMEOUT = 10.0  # seconds a worker has to run its done hooks after draining (SIGTERM)

logger = logging.getLogger(__name__)


class SupervisorLink:
    """A worker's end of the socket pair it shares with the supervisor.

    The worker sends one byte once it serves: a worker with a startup error exits before, so
    the supervisor tells the two apart. End of file means the supervisor is gone, even killed;
    the worker then stops rather than keep serving unsupervised.
    """

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)

    def ready(self) -> None:
        self.sock.sendall(b"r")

    def on_supervisor_exit(self, callback: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()

        def readable() -> None:
            loop.remove_reader(self.sock)
            callback()

        loop.add_reader(self.sock, readable)


@dataclass
class Worker:
    process: asyncio.subprocess.Process
    link: socket.socket
    ready: bool = False


class Supervisor:
    """Starts the workers, restarts those that die, serves /metrics for all of them."""

    def __init__(self, argv: Sequence[str], directory: str, drain_seconds: float) -> None:
        self.argv = list(argv)
        self.directory = directory
        self.drain_seconds = drain_seconds
        self.workers: dict[int, Worker] = {}
        self.stopping = asyncio.Event()

    async def run(self, count: int, metrics_host: str, metrics_port: int) -> int:
        """Until SIGTERM or SIGINT; a worker's exit code if one fails to start (it said why)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop_signal)
        server: MetricsServer | None = None
        keepers: list[asyncio.Task[None]] = []
        try:
            # The first alone: a bad option or policy is reported once, not by every worker.
            if not await self.start(1) or not all(await asyncio.gather(*map(self.start, range(2, count + 1)))):
                return await self.failure()
            if metrics_port and (server := self.serve_metrics(metrics_host, metrics_port)) is None:
                return 1
            keepers = [asyncio.create_task(self.keep(slot)) for slot in self.workers]
            await self.stopping.wait()
            return 0
        finally:
            for keeper in keepers:
                keeper.cancel()
            await self.stop()
            if server is not None:
                server.stop()

    def stop_signal(self) -> None:
        """The first signal stops the workers gracefully (each drains); a second one is passed on,
        which makes them stop at once."""
        if self.stopping.is_set():
            self.signal_workers()
        self.stopping.set()

    def signal_workers(self) -> None:
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                worker.process.terminate()

    def command(self, slot: int, fd: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "ai_gateway.launcher.serve",
            *self.argv,
            "--worker",
            str(slot),
            "--supervisor-fd",
            str(fd),
        ]

    async def start(self, slot: int) -> bool:
        """Start the worker for `slot` and wait until it serves; False if it exited first."""
        ours, theirs = socket.socketpair()
        with theirs:
            process = await asyncio.create_subprocess_exec(
                *self.command(slot, theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                env={**os.environ, MULTIPROC_DIR: self.directory},
                # A terminal's Ctrl-C reaches the supervisor alone, which stops the workers once.
                start_new_session=True,
            )
        ours.setblocking(False)
        worker = self.workers[slot] = Worker(process, ours)
        if not await asyncio.get_running_loop().sock_recv(ours, 1):
            return False
        worker.ready = True
        logger.info("ai-gateway: worker %d serving (pid %d)", slot, process.pid)
        return True

    async def keep(self, slot: int) -> None:
        """Restart the worker in `slot` whenever it dies."""
        while True:
            worker = self.workers[slot]
            returncode = await worker.process.wait()
            worker.link.close()
            mark_process_dead(worker.process.pid, self.directory)
            logger.warning(
                "ai-gateway: worker %d (pid %d) %s; restarting%s",
                slot,
                worker.process.pid,
                exit_reason(returncode),
                "" if worker.ready else f" in {RESTART_DELAY:g} s",
            )
            if not worker.ready:
                await asyncio.sleep(RESTART_DELAY)
            await self.start(slot)

    async def failure(self) -> int:
        """The exit code of the first worker that failed to start."""
        for worker in self.workers.values():
            if not worker.ready:
                return await worker.process.wait() or 1
        return 1

    def serve_metrics(self, host: str, port: int) -> MetricsServer | None:
        """The sum over every worker's files, dead workers' counters included; None if the port is taken."""
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.directory)
        try:
            server = MetricsServer(registry, host, port)
        except OSError as e:
            logger.error("ai-gateway: cannot serve metrics on %s:%d: %s", host, port, e.strerror or e)
            return None
        logger.info("ai-gateway: metrics on http://%s:%d/metrics (%d workers)", host, server.port, len(self.workers))
        if not is_loopback(host):
            logger.warning("ai-gateway: the metrics endpoint listens on %s, beyond this machine", host)
        return server

    async def stop(self) -> None:
        """SIGTERM every worker (each drains, then runs its done hooks); SIGKILL any still there
        STOP_TIMEOUT after its drain deadline."""
        processes = [worker.process for worker in self.workers.values()]
        self.signal_workers()
        try:
            timeout = self.drain_seconds + STOP_TIMEOUT
            await asyncio.wait_for(asyncio.gather(*(process.wait() for process in processes)), timeout)
        except TimeoutError:
            for process in processes:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            await asyncio.gather(*(process.wait() for process in processes))
        for worker in self.workers.values():
            worker.link.close()


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


def require_fixed_port(opts: Options) -> None:
    """Workers binding port 0 would each get a port of their own."""
    for spec in opts.mode:
        if mode_specs.ProxyMode.parse(spec).listen_port(opts.listen_port) == 0:
            raise exceptions.OptionsError("--workers needs a fixed listen port, not 0")


async def supervise(argv: Sequence[str], count: int, opts: Options) -> int:
    """Run `count` workers with the arguments `argv` until SIGTERM or SIGINT."""
    directory = tempfile.mkdtemp(prefix="ai-gateway-metrics-")
    try:
        supervisor = Supervisor(argv, directory, opts.gateway_drain_seconds)
        return await supervisor.run(count, opts.gateway_metrics_host, opts.gateway_metrics_port)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
