"""mitmweb's relay rate deep into a long Realtime session, with and without the gateway's history handling.

mitmweb recomputes a flow's message sizes over every stored message each time a message passes, so a
session slows down as it grows. This measures the message rate (and mitmweb's memory) at a given depth:
bare mitmweb, the gateway with relayed audio replaced by placeholders (its default under mitmweb), and
the gateway keeping full audio. `python -m ai_gateway_tools.bench.mitmweb --messages 30000`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

import psutil
import websockets

from ai_gateway_tools.bench.configs import BareMitmdump
from ai_gateway_tools.bench.measure import MB, rss_mb
from ai_gateway_tools.debug import web_url
from ai_gateway_tools.harness import GatewayProcess, free_port
from ai_gateway_tools.simulators.realtime import SimulatorThread

WINDOW = 1000  # messages per rate sample


@dataclass(frozen=True)
class Run:
    name: str
    early_rate: float  # messages/s over the first WINDOW messages
    late_rate: float  # messages/s over the last WINDOW messages
    kept_mb: float  # message content mitmweb holds for the session, by its own account
    rss_mb: float


CONFIGURATIONS: dict[str, dict[str, str] | None] = {
    "mitmweb, no addon": None,
    "mitmweb + gateway (audio placeholders)": {"gateway_strip_audio": "true", "gateway_audio_session_mb": "0"},
    "mitmweb + gateway (full audio kept)": {"gateway_strip_audio": "false"},
}


async def relay(url: str, messages: int) -> tuple[float, float]:
    """One session whose single response streams `messages` audio deltas; rates at its start and end."""
    stamps: list[float] = []
    async with websockets.connect(url, max_size=None, compression=None) as ws:
        await ws.recv()  # session.created
        await ws.send(json.dumps({"type": "response.create", "response": {"metadata": {"sim_deltas": str(messages)}}}))
        while len(stamps) < messages:
            frame = await ws.recv()
            if '"response.output_audio.delta"' in frame[:60]:
                stamps.append(time.perf_counter())
        while json.loads(await ws.recv())["type"] != "response.done":
            pass
    return WINDOW / (stamps[WINDOW - 1] - stamps[0]), WINDOW / (stamps[-1] - stamps[-WINDOW])


def measure(name: str, options: dict[str, str] | None, upstream: str, messages: int) -> Run:
    web = ["--web-port", str(free_port()), "--no-web-open-browser"]
    proxy = GatewayProcess if options is not None else BareMitmdump
    gateway = proxy(upstream, tool="mitmweb", options=options, args=web)
    with gateway:
        url = gateway.url.replace("http://", "ws://") + "/v1/realtime?model=gpt-realtime"
        early, late = asyncio.run(relay(url, messages))
        assert gateway.process is not None
        return Run(name, early, late, kept_mb(gateway, int(web[1])), rss_mb(psutil.Process(gateway.process.pid)))


def kept_mb(gateway: GatewayProcess, web_port: int) -> float:
    """The session's stored message bytes, from mitmweb's flow list API (what its UI shows)."""
    token = web_url(gateway).split("token=", 1)[1]
    request = urllib.request.Request(f"http://127.0.0.1:{web_port}/flows", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        flows = json.loads(response.read())
    return sum(f["websocket"]["messages_meta"]["contentLength"] for f in flows if f.get("websocket")) / MB


def table(runs: Sequence[Run], messages: int) -> str:
    header = f"| configuration | msg/s, first {WINDOW:,} | msg/s, last {WINDOW:,} of {messages:,} | kept | RSS |"
    lines = [header, "|---|---|---|---|---|"]
    lines += [
        f"| {r.name} | {r.early_rate:,.0f} | {r.late_rate:,.0f} | {r.kept_mb:,.1f} MB | {r.rss_mb:,.0f} MB |"
        for r in runs
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=30_000)
    args = parser.parse_args(argv)
    with SimulatorThread(audio_deltas=0, transcript_deltas=0) as simulator:
        runs = [measure(name, options, simulator.url, args.messages) for name, options in CONFIGURATIONS.items()]
    print(table(runs, args.messages))


if __name__ == "__main__":
    main()
