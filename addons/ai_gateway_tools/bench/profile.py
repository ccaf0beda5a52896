"""py-spy under the capacity load: where a relay's CPU goes at a given number of live voice sessions.

Each configuration runs alone, pinned as in the capacity benchmark, while `py-spy record` samples
it (its workers too, `--subprocesses`); the report is the share of samples per code area (the
gateway's own package, mitmproxy, asyncio, …; a sample counts for the innermost area of its
stack that is listed first below) and the functions with the most samples of their own. Samples of
threads waiting in a selector (the metrics server's, an idle event loop) or for a thread pool's
next job are left out (uvloop waits in C: its idle time shows as `Runner.run`, not left out). py-spy reads
Python processes only: Portkey (Node.js) cannot be profiled this way.

    python -m ai_gateway_tools.bench.profile [--configs serve,gateway,mitmdump] [--sessions 100] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ai_gateway_tools.bench import capacity
from ai_gateway_tools.bench.configs import GATEWAY, MITMDUMP, PORTKEY, SERVE, Workdir, endpoint
from ai_gateway_tools.loadgen import Stop, event_loop_factory

# Where a sample's time goes: the first of these found in its stack, innermost frame first.
AREAS = (
    ("gateway (ai_gateway)", "ai_gateway/"),
    ("mitmproxy: hook dispatch and addons", "mitmproxy/addonmanager.py"),
    ("mitmproxy: websocket layer", "mitmproxy/proxy/layers/websocket.py"),
    ("wsproto (frame parsing)", "wsproto/"),
    ("mitmproxy: other", "mitmproxy/"),
    ("asyncio / uvloop", "asyncio/"),
)


# Leaf frames of threads that wait: selectors, and a thread pool's worker blocked on its queue
# (the policy watcher's to_thread; its wait is in C, so py-spy shows `_worker` as the leaf).
IDLE = (
    "_PollLikeSelector.select",
    "EpollSelector.select",
    "BaseSelector.select",
    "_worker (concurrent/futures/thread.py",
)


def area(stack: Sequence[str]) -> str:
    for frame in reversed(stack):
        for name, marker in AREAS:
            if marker in frame:
                return name
    return "other (interpreter, C, stdlib)"


def summarize(raw: str, top: int = 8) -> str:
    """py-spy's raw format: one line per distinct stack, frames separated by `;`, then the count."""
    areas: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        stack, count = stack_text.split(";"), int(count_text)
        if stack[-1].startswith(IDLE):
            continue
        total += count
        areas[area(stack)] += count
        own[stack[-1]] += count
    if not total:
        return "no samples"
    lines = [f"{total} samples"]
    lines += [f"  {share / total:6.1%}  {name}" for name, share in areas.most_common()]
    lines.append("  functions with the most samples of their own:")
    lines += [f"  {share / total:6.1%}  {name}" for name, share in own.most_common(top)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ai_gateway_tools.bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(c.name for c in (SERVE, GATEWAY, MITMDUMP)))
    p.add_argument("--sessions", type=int, default=100)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    options = p.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    args = capacity.parse_args([])  # the capacity benchmark's turn
    configs = [c for c in capacity.CONFIGS if c.name in options.configs.split(",")]
    if PORTKEY in configs:
        p.error("py-spy profiles Python processes only; Portkey runs on Node.js")
    cpus = capacity.Cpus.split()
    capacity.pin(os.getpid(), cpus.load)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp, capacity.simulator(args) as upstream:
        work = Workdir.create(Path(tmp))
        for config in configs:
            with endpoint(config, upstream, work) as proxy:
                assert proxy is not None and proxy.process is not None
                capacity.pin(proxy.process.pid, cpus.relay)
                output = Path(tmp) / f"{config.name}.txt"
                record = [
                    py_spy, "record", "--format", "raw", "--rate", str(options.rate), "--subprocesses",
                    "--duration", str(int(options.seconds)), "--output", str(output), "--pid", str(proxy.process.pid),
                ]  # fmt: skip
                spy = subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                load = capacity.turns(
                    config, proxy, upstream, args, "profile", Stop(seconds=options.seconds), options.sessions
                )
                asyncio.run(load, loop_factory=event_loop_factory(True))
                spy.wait()
                print(f"## {config.name}, {options.sessions} sessions\n{summarize(output.read_text())}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
