"""Gateways for the tests, forked from a process that has already imported them (a fork server).

Starting a gateway process costs about 1.5 s of CPU, nearly all of it importing mitmproxy, the
gateway and the price database; the suite starts some 270 of them, so importing was half of its
work. So each xdist worker starts one fork server (`python tests/forkserver.py`), which imports
all that once, never starts a thread or an event loop, and forks a child per gateway. The child
is then what `mitmdump -s addons/gateway.py …` (or `mitmweb …`) or `python -m ai_gateway.launcher.serve …`
is: its own process, its own sockets, its argv, environment and working directory, its output in
the test's log file, started by the same entry point the command runs (`mitmproxy.tools.main.mitmdump`
or `.mitmweb`, the serve module run as `__main__`). Only the imports happened before the fork.

What the fork server does not start is started as before (`subprocess.Popen`): anything
with a Python environment of its own (PYTHON* variables other than the worker's), other programs.
Tests about what a process does while it starts exec the real command themselves (test_startup),
as do the benchmarks (`scripts/bench` never uses this). `AI_GATEWAY_TEST_EXEC=1` turns it off.

The server and the worker talk over a Unix SOCK_SEQPACKET pair, one JSON message per packet: a
request carries the log file's descriptor (SCM_RIGHTS); the server answers with the child's pid,
and later with its exit status, which a thread of the worker hands to the `ForkedProcess`.
"""

from __future__ import annotations

import array
import contextlib
import gc
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

SERVE_MODULE = "ai_gateway.launcher.serve"
# Imported before any fork: what a gateway process spends its start on.
PRELOAD = (
    "mitmproxy.tools.main",
    "mitmproxy.tools.dump",
    "mitmproxy.tools.web.master",  # mitmweb's (tornado): shared with the rest, it adds little to the server's start
    "ai_gateway.proxy.addon",
    "ai_gateway.launcher.workers",  # and serve's other imports; never serve itself, which runs as __main__
    "uvloop",
    "genai_prices.data",
    "genai_prices.data_snapshot",
)
MAX_PACKET = 1 << 20
TOOLS = ("mitmdump", "mitmweb")  # mitmproxy's commands the server runs, by their entry points in mitmproxy.tools.main


class ForkedProcess:
    """What the tests use of `subprocess.Popen`, for a child of the fork server."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.exited = threading.Event()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self.exited.wait(timeout):
            raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class ForkServer:
    """The worker's side: starts the server on first use, asks it for children, learns of their exits."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.socket: socket.socket | None = None
        self.listener: threading.Thread | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self.children: dict[int, ForkedProcess] = {}
        self.started: list[dict[str, Any]] = []  # pid answers, for the one request in flight
        self.answered = threading.Condition(self.lock)

    def forkable(self, argv: Sequence[str], env: Mapping[str, str]) -> bool:
        """Whether the command is one the server has imported, in the worker's Python environment."""
        if os.environ.get("AI_GATEWAY_TEST_EXEC") == "1":
            return False
        python = {k: v for k, v in env.items() if k.startswith("PYTHON")}
        if python != {k: v for k, v in os.environ.items() if k.startswith("PYTHON")}:
            return False
        return entry(argv) is not None

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], log: IO[bytes]) -> ForkedProcess:
        request = json.dumps({"argv": list(argv), "env": dict(env), "cwd": os.getcwd()}).encode()
        with self.lock:
            sock = self.connect()
            socket.send_fds(sock, [request], [log.fileno()])
            while not self.started:
                if not self.answered.wait(60):
                    raise RuntimeError("the fork server did not answer")
            answer = self.started.pop()
            if "error" in answer:
                raise RuntimeError(f"the fork server could not start {argv}: {answer['error']}")
            child = self.children[answer["pid"]] = ForkedProcess(answer["pid"])
            return child

    def connect(self) -> socket.socket:
        """The server, started on the first request (called with the lock held)."""
        if self.socket is not None:
            return self.socket
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.server = subprocess.Popen(
            [sys.executable, __file__, str(theirs.fileno())], pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL
        )
        theirs.close()
        self.socket = ours
        self.listener = threading.Thread(target=self.listen, name="forkserver", daemon=True)
        self.listener.start()
        return ours

    def listen(self) -> None:
        assert self.socket is not None
        while packet := self.socket.recv(MAX_PACKET):
            message = json.loads(packet)
            with self.lock:
                if "exit" in message:
                    child = self.children.pop(message["exit"], None)
                    if child is not None:
                        child.returncode = message["code"]
                        child.exited.set()
                else:
                    self.started.append(message)
                    self.answered.notify_all()

    def close(self) -> None:
        """Children still running are killed; the server ends when its socket closes."""
        for child in list(self.children.values()):
            child.kill()
        if self.socket is not None:
            self.socket.shutdown(socket.SHUT_RDWR)  # wakes the listening thread; the server sees the end
            if self.listener is not None:
                self.listener.join(10)  # closed under a thread still reading, its recv would fail (EBADF)
            self.socket.close()
        if self.server is not None:
            self.server.wait(10)


def entry(argv: Sequence[str]) -> str | None:
    """What the command runs: `mitmdump` or `mitmweb`, the serve module, or None (not the fork server's)."""
    if Path(argv[0]).name in TOOLS and Path(argv[0]).parent == Path(sys.executable).parent:
        return Path(argv[0]).name
    if argv[0] == sys.executable and list(argv[1:3]) == ["-m", SERVE_MODULE]:
        return SERVE_MODULE
    return None


# The server's side: runs in `python tests/forkserver.py FD`.


def serve(sock: socket.socket) -> None:
    """Fork a child per request and report its exit, until the worker closes the socket."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    while True:
        ready, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
            reap(sock)
        if sock in ready:
            fds = array.array("i")
            packet, ancillary, _, _ = sock.recvmsg(MAX_PACKET, socket.CMSG_SPACE(fds.itemsize))
            if not packet:
                return
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            try:
                pid = fork(json.loads(packet), fds[0], [sock.fileno(), wake_r, wake_w])
                sock.send(json.dumps({"pid": pid}).encode())
            except Exception as e:  # the worker is told, and raises
                sock.send(json.dumps({"error": repr(e)}).encode())
            finally:
                for fd in fds:
                    os.close(fd)


def reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sock.send(json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}).encode())


def fork(request: dict[str, Any], log: int, inherited: list[int]) -> int:
    pid = os.fork()
    if pid == 0:
        child(request, log, inherited)
    return pid


def child(request: dict[str, Any], log: int, inherited: list[int]) -> NoReturn:
    """The forked process: the request's output, directory and environment, then its command."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in inherited:
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        code = run(request["argv"])
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def run(argv: list[str]) -> int:
    """The command's entry point in this (forked) process, as its program would run it."""
    import atexit
    import random
    import runpy

    random.seed()  # each child its own random sequence, as a fresh process
    try:
        if (tool := entry(argv)) in TOOLS:
            from mitmproxy.tools import main as tools

            sys.argv = [argv[0], *argv[1:]]
            result: Any = getattr(tools, tool)()
        else:
            sys.argv = [argv[0], *argv[3:]]
            runpy.run_module(SERVE_MODULE, run_name="__main__", alter_sys=True)
            result = 0
    except SystemExit as e:
        result = e.code
    atexit._run_exitfuncs()
    if result is None:
        return 0
    return result if isinstance(result, int) else 1


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    for module in PRELOAD:
        __import__(module)
    gc.freeze()  # what was imported stays shared with the children: their collections never walk it
    serve(sock)


if __name__ == "__main__":
    main()
