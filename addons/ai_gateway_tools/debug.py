"""scripts/debug: watch Realtime sessions through the gateway in mitmweb, no key and no network needed.

Starts mitmweb with the gateway in front of the built-in simulated Realtime upstream (or --upstream),
prints the web UI's address with its login token and the ws:// address clients connect to, with
--drive runs a session through it so there is something to look at (against the simulator: a voice
session with every kind of turn, server-VAD turns, a barge-in the client cancels and truncates, a
function call and its result; against a real upstream: three short text answers), relays mitmweb's
log and runs until Ctrl-C, which stops mitmweb and the simulator.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import websockets

from ai_gateway_tools.demo import drive_session, upstream
from ai_gateway_tools.harness import GatewayProcess

MODEL = "gpt-realtime"
DRIVEN_RESPONSES = 3  # against a real upstream
LOG_POLL_SECONDS = 0.2
# The simulator paced for a voice session: deltas far enough apart for a barge-in to land mid-answer.
VOICE_SIMULATOR: dict[str, Any] = {"audio_deltas": 3, "transcript_deltas": 5, "delta_interval": 0.05}
VOICE = base64.b64encode(bytes(24_000)).decode()  # half a second of silence: server VAD hears a whole turn
TRUNCATED_MS = 120  # where the barge-in cuts the answer's audio
TOOL = "get_weather"

_WEB_URL = re.compile(r"Web server listening at (\S+)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # `kill` stops it as cleanly as Ctrl-C does: the context managers below stop mitmweb and the simulator.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with (
            upstream(args.upstream, **VOICE_SIMULATOR) as (url, simulator),
            mitmweb(url, web_port=args.web_port, port=args.port) as gateway,
        ):
            simulated = simulator is not None
            print(banner(gateway, url, simulated=simulated), flush=True)
            started = len(gateway.log())
            if args.drive and simulated:
                asyncio.run(drive_voice_session(gateway.url))
            elif args.drive:
                asyncio.run(drive_session(gateway.url, MODEL, DRIVEN_RESPONSES, real=True))
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
        "--drive",
        action="store_true",
        help="run a session first: a voice session with a barge-in and a function call against the simulator, "
        f"{DRIVEN_RESPONSES} short text answers with the openai SDK against --upstream",
    )
    args = parser.parse_args(argv)
    if args.drive and args.upstream and not os.environ.get("OPENAI_API_KEY"):
        parser.error("--drive with --upstream needs OPENAI_API_KEY in the environment")
    return args


async def drive_voice_session(gateway_url: str, model: str = MODEL) -> None:
    """Two server-VAD voice turns, a barge-in on the second answer (the user speaks over it, the
    client cancels it and truncates its audio where the user stopped hearing it), a third voice turn,
    then a function call, its output and the answer after it: what a voice agent with tools does.
    Against the simulator (VOICE_SIMULATOR), which transcribes speech and calls a function on request."""
    transcribed = {"model": "gpt-4o-transcribe"}
    vad = {
        "type": "realtime",
        "audio": {"input": {"turn_detection": {"type": "server_vad"}, "transcription": transcribed}},
    }
    base = gateway_url.replace("http://", "ws://", 1)
    async with websockets.connect(f"{base}/v1/realtime?model={model}") as ws:

        async def until(kind: str) -> dict[str, Any]:
            while (event := json.loads(await ws.recv()))["type"] != kind:
                pass
            return event

        async def send(**event: Any) -> None:
            await ws.send(json.dumps(event))

        await until("session.created")
        await send(type="session.update", session=vad)
        await send(type="input_audio_buffer.append", audio=VOICE)
        await until("response.done")
        await send(type="input_audio_buffer.append", audio=VOICE)
        delta = await until("response.output_audio.delta")
        await send(type="input_audio_buffer.append", audio=VOICE[: len(VOICE) // 4])  # the user speaks over it
        await send(type="response.cancel")
        await send(
            type="conversation.item.truncate", item_id=delta["item_id"], content_index=0, audio_end_ms=TRUNCATED_MS
        )
        if (await until("response.done"))["response"]["status"] != "cancelled":
            raise RuntimeError("the upstream finished the answer the client cancelled")
        await send(type="input_audio_buffer.append", audio=VOICE)  # the rest of the user's turn
        await until("response.done")
        await send(type="response.create", response={"metadata": {"sim_function_call": TOOL}})
        call = (await until("response.done"))["response"]["output"][0]
        output = {"type": "function_call_output", "call_id": call["call_id"], "output": '{"temperature": 18}'}
        await send(type="conversation.item.create", item=output)
        await send(type="response.create")
        await until("response.done")


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
