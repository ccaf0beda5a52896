"""Paired capacity: configurations under the capacity benchmark's load at the same time, so that a
ratio between them is not the machine's drift between two steps (issue #24).

`--capacity` measures one configuration after another; on a shared machine the CPU a step costs
moves by several per cent from one minute to the next, as much as the cost of guards it is meant
to show. Here every configuration is started, pinned to the same CPU, and driven at once with the
same sessions, round after round. A round's ratio for a configuration is the first one's CPU per
relayed server frame over its own: its projected sessions per core over the first's, as
`--capacity` projects them. The median of the rounds is reported. The relays share their core, so
`--sessions` is per configuration, kept to what that core and the load's carry for all of them.

    python -m ai_gateway_tools.bench.paired [--configs serve,serve-guarded-regex,serve-guarded]
        [--sessions 70] [--seconds 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ai_gateway_tools.bench import capacity
from ai_gateway_tools.bench.configs import SERVE, SERVE_GUARDED, SERVE_GUARDED_REGEX, Config, Workdir, endpoint
from ai_gateway_tools.bench.report import table
from ai_gateway_tools.harness import GatewayProcess
from ai_gateway_tools.loadgen import LoadStats, Stop, UpstreamProcess, event_loop_factory


@dataclass(frozen=True)
class Round:
    """One round: each configuration's relay CPU (seconds) and the server frames its clients got."""

    cpu: list[float]
    frames: list[int]
    load_share: float  # the clients' CPU (this process) over the round's time: whether they kept up
    failed: list[str] = field(default_factory=list)  # why sessions ended early, any configuration's

    def per_frame(self, i: int) -> float:
        return self.cpu[i] / self.frames[i] if self.frames[i] else float("inf")

    def ratio(self, i: int) -> float:
        """Configuration i's projected sessions per core over the first configuration's."""
        return self.per_frame(0) / self.per_frame(i)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ai_gateway_tools.bench.paired", description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(c.name for c in (SERVE, SERVE_GUARDED_REGEX, SERVE_GUARDED)))
    p.add_argument("--sessions", type=int, default=70, help="per configuration")
    p.add_argument("--seconds", type=float, default=20, help="of load per round")
    p.add_argument("--rounds", type=int, default=3)
    return p


def drive_all(configs: Sequence[Config], proxies: Sequence[GatewayProcess], upstream: UpstreamProcess,
              args: argparse.Namespace, turn: argparse.Namespace, n: int) -> Round:  # fmt: skip
    """One round: every configuration's sessions at once (each taking `turn`s), the relays' CPU taken around them."""

    async def load() -> list[LoadStats]:
        stop = Stop(seconds=args.seconds)
        drives = (
            capacity.turns(config, proxy, upstream, turn, f"paired-{n}", stop, args.sessions)
            for config, proxy in zip(configs, proxies, strict=True)
        )
        return await asyncio.gather(*drives)

    relays = [capacity.relay_processes(proxy) for proxy in proxies]
    before = [capacity.cpu_of(r) for r in relays]
    began, load_before = time.monotonic(), time.process_time()
    stats = asyncio.run(load(), loop_factory=event_loop_factory(True))
    load_share = (time.process_time() - load_before) / (time.monotonic() - began)
    cpu = [capacity.cpu_of(r) - b for r, b in zip(relays, before, strict=True)]
    failed = [f"{config.name}: {why}" for config, s in zip(configs, stats, strict=True) for why in s.failures]
    return Round(cpu, [len(s.latencies) for s in stats], load_share, failed)


def report(configs: Sequence[Config], rounds: Sequence[Round]) -> str:
    rows = []
    for i, config in enumerate(configs):
        per_frame = [r.per_frame(i) * 1e6 for r in rounds]
        ratios = [r.ratio(i) for r in rounds]
        rows.append([
            config.name,
            " ".join(f"{x:.0f}" for x in per_frame),
            " ".join(f"{x:.3f}" for x in ratios),
            f"**{statistics.median(ratios):.3f}**",
        ])  # fmt: skip
    header = ["configuration", "relay CPU per server frame (µs), each round", f"÷ {configs[0].name}'s", "median"]
    notes = [
        "Server frames relayed per round (each configuration's where they differ: its sessions stop at "
        "the round's end, a turn apart): " + ", ".join(_frames(r.frames) for r in rounds),
        "The clients' CPU, of their core: " + ", ".join(f"{r.load_share:.0%}" for r in rounds),
        "Sessions that ended early: " + ("; ".join(why for r in rounds for why in r.failed) or "none"),
    ]
    return table(header, rows) + "\n\n" + "\n".join(notes)


def _frames(frames: Sequence[int]) -> str:
    return str(frames[0]) if len(set(frames)) == 1 else "/".join(map(str, frames))


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    names = args.configs.split(",")
    known = {c.name: c for c in capacity.CONFIGS if c.proxy is not None}
    if unknown := [n for n in names if n not in known]:
        p.error(f"--configs: not a relay of the capacity benchmark: {', '.join(unknown)}")
    configs = [known[n] for n in names]
    turn = capacity.parse_args([])  # the capacity benchmark's turn
    cpus = capacity.Cpus.split()
    capacity.pin(os.getpid(), cpus.load)
    with (
        tempfile.TemporaryDirectory(prefix="bench-paired-") as tmp,
        capacity.simulator(turn) as upstream,
        contextlib.ExitStack() as stack,
    ):
        work = Workdir.create(Path(tmp))
        proxies = [stack.enter_context(endpoint(c, upstream, work)) for c in configs]
        for proxy in proxies:
            assert proxy is not None and proxy.process is not None
            capacity.pin(proxy.process.pid, cpus.relay)
        rounds = [drive_all(configs, proxies, upstream, args, turn, n) for n in range(args.rounds)]
    print(f"{args.sessions} sessions per configuration, {args.seconds:g} s a round, {cpus.describe()}\n")
    print(report(configs, rounds), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
