"""scripts/debug: watch Realtime sessions through the gateway in mitmweb, no key and no network needed.

Starts mitmweb with the gateway in front of the built-in simulated Realtime upstream (or --upstream),
prints the web UI's address with its login token and the ws:// address clients connect to, with
--drive runs a short session through it so there is something to look at, relays mitmweb's log and
runs until Ctrl-C, which stops mitmweb and the simulator.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import time

from ai_gateway_tools.demo import drive_session, upstream
from ai_gateway_tools.harness import GatewayProcess

MODEL = "gpt-realtime"
DRIVEN_RESPONSES = 3
LOG_POLL_SECONDS = 0.2

_WEB_URL = re.compile(r"Web server listening at (\S+)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # `kill` stops it as cleanly as Ctrl-C does: the context managers below stop mitmweb and the simulator.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with (
            upstream(args.upstream) as (url, simulator),
            mitmweb(url, web_port=args.web_port, port=args.port) as gateway,
        ):
            simulated = simulator is not None
            print(banner(gateway, url, simulated=simulated), flush=True)
            started = len(gateway.log())
            if args.drive:
                asyncio.run(drive_session(gateway.url, MODEL, DRIVEN_RESPONSES, real=not simulated))
            stopped = "mitmweb and the simulator" if simulated else "mitmweb"
            print(f"Ctrl-C stops {stopped}; mitmweb's log follows.\n", flush=True)
            return follow_log(gateway, started)
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError) as e:  # mitmweb did not start: a port in use, an invalid option
        print(f"scripts/debug: {e}", file=sys.stderr)
        return 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/debug", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8080, help="port clients connect to (default: %(default)s)")
    parser.add_argument("--web-port", type=int, default=8081, help="port of mitmweb's UI (default: %(default)s)")
    parser.add_argument("--upstream", help="a real upstream, e.g. https://api.openai.com, instead of the simulator")
    parser.add_argument(
        "--drive", action="store_true", help=f"run a {DRIVEN_RESPONSES}-response session with the openai SDK first"
    )
    args = parser.parse_args(argv)
    if args.drive and args.upstream and not os.environ.get("OPENAI_API_KEY"):
        parser.error("--drive with --upstream needs OPENAI_API_KEY in the environment")
    return args


def mitmweb(upstream_url: str, *, web_port: int, port: int | None = None) -> GatewayProcess:
    """The gateway under mitmweb as scripts/debug runs it and the browser test checks it.

    No browser is opened: the address is printed, and on a server there is no browser to open.
    `port` None keeps the harness's free port.
    """
    gateway = GatewayProcess(upstream_url, tool="mitmweb", args=["--web-port", str(web_port), "--no-web-open-browser"])
    if port is not None:
        gateway.port = port
    return gateway


def web_url(gateway: GatewayProcess, timeout: float = 10.0) -> str:
    """The UI's address with its login token, as mitmweb logs it.

    mitmweb 12 refuses the UI without a token (a random one per start) or the `web_password` option.
    Reading the token from the log keeps a password off the command line, where every local user can
    read it, and spares mitmweb's warning about plaintext passwords.
    """
    deadline = time.monotonic() + timeout
    while not (match := _WEB_URL.search(gateway.log())):
        if gateway.process is None or gateway.process.poll() is not None or time.monotonic() > deadline:
            raise TimeoutError(f"mitmweb logged no web UI address:\n{gateway.log()}")
        time.sleep(0.05)
    return match.group(1)


def banner(gateway: GatewayProcess, upstream_url: str, *, simulated: bool) -> str:
    ws_base = gateway.url.replace("http://", "ws://", 1) + "/v1"
    return "\n".join(
        [
            f"upstream  {upstream_url}{' (built-in simulator)' if simulated else ''}",
            f"web UI    {web_url(gateway)}",
            f"clients   {ws_base}/realtime?model={MODEL}",
            f'          openai SDK: AsyncOpenAI(websocket_base_url="{ws_base}")',
            f"metrics   {gateway.metrics_url}",
            "",
        ]
    )


def follow_log(gateway: GatewayProcess, shown: int) -> int:
    """Relay mitmweb's log from character `shown` until it exits; returns its exit code.

    The harness sends mitmweb's output to a file (so tests can read it); a developer wants to see
    connections and the gateway's warnings as they happen.
    """
    assert gateway.process is not None  # started by the caller
    while True:
        try:
            code = gateway.process.wait(LOG_POLL_SECONDS)
        except subprocess.TimeoutExpired:
            code = None
        text = gateway.log()
        print(text[shown:], end="", flush=True)
        shown = len(text)
        if code is not None:
            return code


if __name__ == "__main__":
    sys.exit(main())
