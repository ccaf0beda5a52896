"""scripts/bench --capacity: how many live voice sessions one core carries (issue #17), side by side with peers.

Sessions run as a voice agent runs them: the user speaks (a client audio append every 100 ms),
then asks for a response, which the upstream streams at the speed of speech (a 100 ms audio
delta every 100 ms, then the transcript deltas, paced alike) and ends with one `response.done`.
No leg is compressed (the clients offer no permessage-deflate, the simulator accepts none).

The session count ramps up (25, 50, 100, …) per configuration until the relay misses the target:
p99 latency per frame at most ADDED_P99_MS over the no-relay baseline measured at the same count
in the same round, no frame lost, no session failed, and the accounting exact (clients received
every usage the simulator ledgered; a gateway's /metrics equal the ledger). Between the last count
met and the first missed, `--bisect` more steps narrow it down. A frame's latency is its arrival
less the moment it was due: from the client's `response.create`, plus the pacing of the deltas
before it.

The relay is pinned to one CPU and the load (clients in this process, the simulator in a child,
both on uvloop) to the other, so the relay's figure is per core; the load's CPU share and its own
timing error (how late its appends went out) are in the table, to show whether it kept up.
A step where the baseline itself fails or the load saturates its core ends the ramp there.

    python -m ai_gateway_tools.bench --capacity [--smoke] [--configs …] [--ramp 25,50,…]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from tqdm import tqdm

from ai_gateway_tools.bench import litellm, portkey
from ai_gateway_tools.bench.checks import accounting_problems
from ai_gateway_tools.bench.configs import (
    DIRECT,
    FLOOR,
    GATEWAY,
    GATEWAY_FRAMES,
    GATEWAY_MESSAGES,
    GATEWAY_NOFREEZE,
    LITELLM,
    MITMDUMP,
    PORTKEY,
    SERVE,
    SERVE_FRAMES,
    SERVE_GUARDED,
    SERVE_GUARDED_DEAD,
    SERVE_GUARDED_REGEX,
    SERVE_GUARDED_SLOW,
    SERVE_MESSAGES,
    SERVE_WORKERS2,
    Config,
    Workdir,
    address,
    endpoint,
    model,
)
from ai_gateway_tools.bench.measure import cpu_seconds, percentile
from ai_gateway_tools.bench.report import add_run_flags, add_sizes, machine, parse_sized, splice, table
from ai_gateway_tools.harness import GatewayProcess
from ai_gateway_tools.loadgen import LoadStats, Stop, Traffic, UpstreamProcess, event_loop_factory, pcm16_bytes

ADDED_P99_MS = 20.0  # the target: p99 latency per frame over the no-relay baseline's
# Before session.created (simulators/realtime.py): a real upstream's session setup, and what keeps Portkey
# from losing it (BENCHMARKS.md); outside the latency figures, which time frames from `response.create`.
GREETING_DELAY = 0.05
LOAD_SATURATED = 0.9  # the load's share of its CPU above which a miss may be the load's own
CONFIGS = (
    DIRECT, SERVE, SERVE_MESSAGES, SERVE_FRAMES, SERVE_GUARDED, SERVE_GUARDED_REGEX, SERVE_GUARDED_SLOW,
    SERVE_GUARDED_DEAD, SERVE_WORKERS2, GATEWAY, GATEWAY_MESSAGES, GATEWAY_FRAMES, GATEWAY_NOFREEZE, MITMDUMP, FLOOR,
    LITELLM, PORTKEY,
)  # fmt: skip
DEFAULT_CONFIGS = (DIRECT, SERVE, SERVE_WORKERS2, GATEWAY, MITMDUMP)
INSTALLS: dict[str, Callable[[], Path]] = {LITELLM.name: litellm.install, PORTKEY.name: portkey.install}
# The targets of issue #17: (configuration, reference, ratio of their capacities it must reach).
RATIOS = (
    (GATEWAY, MITMDUMP, 0.97),
    (SERVE, PORTKEY, 1.5),
    (SERVE, LITELLM, 2.5),
    (SERVE_WORKERS2, SERVE, 1.6),
    (SERVE_GUARDED, SERVE, 0.95),  # issue #24: guards on, a moderation service asked off the relay
    (SERVE_GUARDED_REGEX, SERVE, 0.95),  # the same without the service: the guards' own cost
)
BEGIN = "<!-- capacity:begin: written by scripts/bench --capacity; text outside these markers is kept -->"
END = "<!-- capacity:end -->"
PLOT_NAME = "bench-capacity.png"

# flag, type, default, what it sizes
SIZES: tuple[tuple[str, type, object, str], ...] = (
    ("--ramp", str, "25,50,100,200,400,800,1600", "session counts, comma-separated, tried in turn"),
    ("--bisect", int, 2, "steps between the last count met and the first missed"),
    ("--retries", int, 1, "times a missed count is tried again (in the next round) before it counts as missed"),
    ("--seconds", float, 15, "of load per step (sessions finish the turn they are in)"),
    ("--appends", int, 20, "client audio appends per turn: the user speaking"),
    ("--append-ms", float, 100, "audio per client append, sent every as many ms"),
    ("--audio-deltas", int, 20, "server audio deltas per response"),
    ("--delta-ms", float, 100, "audio per server delta, sent every as many ms"),
    ("--transcript-deltas", int, 5, "per response, paced as the audio"),
)
SMOKE = {
    "configs": "serve,mitmdump",
    "ramp": "2,4",
    "bisect": 0,
    "retries": 0,
    "seconds": 0.3,
    "appends": 2,
    "append_ms": 20,
    "audio_deltas": 2,
    "delta_ms": 20,
    "transcript_deltas": 1,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/bench --capacity", description=__doc__.split("\n\n")[0])
    add_run_flags(p)
    p.add_argument(
        "--configs",
        default=",".join(c.name for c in DEFAULT_CONFIGS),
        help=f"comma-separated, of {', '.join(c.name for c in CONFIGS)} (default: %(default)s); "
        "direct, the baseline, always runs",
    )
    add_sizes(p, SIZES)
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """--smoke shrinks every size the command line does not set, and never writes BENCHMARKS.md."""
    p = parser()
    args = parse_sized(p, argv, SMOKE, "bench-capacity-smoke-")
    names = {name.strip() for name in args.configs.split(",")} | {DIRECT.name}
    unknown = names - {c.name for c in CONFIGS}
    if unknown:
        p.error(f"unknown configurations: {', '.join(sorted(unknown))}")
    args.configs = [c.name for c in CONFIGS if c.name in names]
    try:
        args.ramp = sorted({int(n) for n in args.ramp.split(",")})
    except ValueError:
        p.error(f"--ramp: expected comma-separated session counts, got {args.ramp!r}")
    if not args.ramp or args.ramp[0] < 1:
        p.error("--ramp: session counts must be at least 1")
    return args


def traffic(args: argparse.Namespace) -> Traffic:
    """A turn paced in real time: appends every append_ms, deltas every delta_ms."""
    return Traffic(
        appends=args.appends,
        append_ms=args.append_ms,
        audio_deltas=args.audio_deltas,
        append_interval=args.append_ms / 1000,
        delta_interval=args.delta_ms / 1000,
    )


def turn_seconds(args: argparse.Namespace) -> float:
    return (args.appends * args.append_ms + (args.audio_deltas + args.transcript_deltas) * args.delta_ms) / 1000


def turns(config: Config, proxy: GatewayProcess | None, upstream: UpstreamProcess, args: argparse.Namespace,
          phase: str, stop: Stop, sessions: int) -> Awaitable[LoadStats]:  # fmt: skip
    """The capacity benchmark's load: `sessions` voice sessions through `proxy` (the simulator itself
    when None), each taking the turns `args` sizes, started over one turn's time and going on past
    a failed session; the profiler and the paired benchmark drive the same."""
    return address(proxy, upstream).drive(
        model(config, phase), traffic(args), stop, sessions=sessions, seed=args.seed,
        spread=turn_seconds(args), compression=None, keep_going=True,
    )  # fmt: skip


# --- pinning ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cpus:
    """Where the relay runs and where the load runs; one CPU only means no pinning."""

    relay: frozenset[int]
    load: frozenset[int]

    @classmethod
    def split(cls) -> Cpus:
        available = sorted(os.sched_getaffinity(0))
        if len(available) < 2:
            return cls(frozenset(available), frozenset(available))
        return cls(frozenset(available[:1]), frozenset(available[1:]))

    @property
    def pinned(self) -> bool:
        return self.relay != self.load

    def describe(self) -> str:
        if not self.pinned:
            return "one CPU: relay and load share it (no pinning)"
        return f"the relay on CPU {_cpus(self.relay)}, the clients and the simulator on CPU {_cpus(self.load)}"


def _cpus(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def pin(pid: int, cpus: frozenset[int]) -> None:
    """Every thread of the process (sched_setaffinity applies to one thread) and of its children;
    threads and processes started later inherit it."""
    for process in (psutil.Process(pid), *psutil.Process(pid).children(recursive=True)):
        with contextlib.suppress(OSError, psutil.Error):
            for thread in process.threads():
                os.sched_setaffinity(thread.id, cpus)


def relay_processes(proxy: GatewayProcess | None) -> list[psutil.Process]:
    if proxy is None or proxy.process is None:
        return []
    root = psutil.Process(proxy.process.pid)
    return [root, *root.children(recursive=True)]


def cpu_of(processes: Sequence[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += cpu_seconds(process)
    return total


# --- a step: one configuration at one session count ----------------------------------------------


@dataclass
class Step:
    config: str
    sessions: int
    stats: LoadStats
    seconds: float
    relay_cpu: float | None  # share of one core (workers summed)
    load_cpu: float  # share of the load's cores: clients and simulator
    problems: list[str] = field(default_factory=list)  # frames lost, sessions failed, accounting
    baseline_p99_ms: float | None = None  # direct's, at the same count in the same round

    def p_ms(self, q: float) -> float | None:
        return percentile(self.stats.latencies, q) * 1000 if self.stats.latencies else None

    @property
    def added_p99_ms(self) -> float | None:
        p99 = self.p_ms(99)
        return None if p99 is None or self.baseline_p99_ms is None else p99 - self.baseline_p99_ms

    @property
    def lateness_p99_ms(self) -> float | None:
        return percentile(self.stats.lateness, 99) * 1000 if self.stats.lateness else None

    @property
    def met(self) -> bool:
        added = self.added_p99_ms
        return not self.problems and added is not None and added <= ADDED_P99_MS

    @property
    def projected(self) -> float | None:
        """Sessions one whole core would carry at this step's CPU per session: on a shared machine the
        relay's own CPU seconds are steadier than its latency, which a neighbour's burst spoils."""
        return self.sessions / self.relay_cpu if self.relay_cpu else None

    @property
    def load_saturated(self) -> bool:
        return self.load_cpu >= LOAD_SATURATED

    def why_missed(self) -> str:
        added = self.added_p99_ms
        reasons = list(self.problems)
        if added is not None and added > ADDED_P99_MS:
            reasons.insert(0, f"p99 +{added:.1f} ms")
        return "; ".join(reasons)


def frames_per_response(args: argparse.Namespace) -> int:
    """response.created, rate_limits.updated, the deltas and response.done."""
    return 3 + args.audio_deltas + args.transcript_deltas


class Ramp:
    """The run: every configuration's proxy started once and pinned, then steps round by round."""

    def __init__(self, args: argparse.Namespace, cpus: Cpus) -> None:
        self.args = args
        self.cpus = cpus
        self.configs = [c for c in CONFIGS if c.name in args.configs]
        self.steps: list[Step] = []
        self.stopped: str | None = None  # why the ramp ended early (the baseline's limit)
        self.progress = tqdm(total=self.planned(), unit="step", file=sys.stderr, dynamic_ncols=True)
        self.rounds = 0

    def planned(self) -> int:
        """For the progress bar, an upper bound: a warm-up per proxy, every count, and the bisection."""
        proxied = len(self.configs) - 1
        return proxied + len(self.configs) * len(self.args.ramp) + proxied * self.args.bisect

    def run(self, upstream: UpstreamProcess, work: Workdir) -> list[Step]:
        with self.progress, contextlib.ExitStack() as stack:
            proxies = {c.name: stack.enter_context(endpoint(c, upstream, work)) for c in self.configs}
            for config in self.configs:
                if (proxy := proxies[config.name]) is not None and proxy.process is not None:
                    pin(proxy.process.pid, self.cpus.relay)
                    self.progress.set_description(f"warm-up {config.name}")
                    self.drive(config, proxy, upstream, sessions=2, stop=Stop(turns=1), phase="capacity-warm-up")
                    self.progress.update()
            searches = {
                c.name: Search(self.args.ramp, self.args.bisect, self.args.retries)
                for c in self.configs
                if c is not DIRECT
            }
            while wanted := {name: n for name, search in searches.items() if (n := search.next()) is not None}:
                self.rounds += 1
                for sessions in sorted(set(wanted.values())):
                    baseline = self.step(DIRECT, None, upstream, sessions)
                    if (p99 := baseline.p_ms(99)) is None or p99 > ADDED_P99_MS:  # a neighbour's burst: again
                        baseline = self.step(DIRECT, None, upstream, sessions)
                    if baseline.problems or baseline.load_saturated:
                        self.stopped = f"at {sessions} sessions the baseline (no relay) {_load_limit(baseline)}"
                        return self.steps
                    names = [name for name, n in wanted.items() if n == sessions]
                    for config in _alternate([c for c in self.configs if c.name in names], self.rounds):
                        measured = self.step(config, proxies[config.name], upstream, sessions, baseline)
                        searches[config.name].record(sessions, measured.met)
            return self.steps

    def step(
        self,
        config: Config,
        proxy: GatewayProcess | None,
        upstream: UpstreamProcess,
        sessions: int,
        baseline: Step | None = None,
    ) -> Step:
        self.progress.set_description(f"{config.name} × {sessions} sessions")
        phase = f"capacity-{sessions}-{len(self.steps)}"  # a model per step: each step's ledger and metrics apart
        relay = relay_processes(proxy)
        load = [psutil.Process(), psutil.Process(upstream.process.pid)] if upstream.process else [psutil.Process()]
        relay_before, load_before, started = cpu_of(relay), cpu_of(load), time.perf_counter()
        stats = self.drive(config, proxy, upstream, sessions, Stop(seconds=self.args.seconds), phase)
        seconds = time.perf_counter() - started
        step = Step(
            config=config.name,
            sessions=sessions,
            stats=stats,
            seconds=seconds,
            relay_cpu=(cpu_of(relay) - relay_before) / seconds if relay else None,
            load_cpu=(cpu_of(load) - load_before) / seconds / len(self.cpus.load),
            baseline_p99_ms=baseline.p_ms(99) if baseline else None,
        )
        step.problems = self.problems(config, proxy, upstream, phase, stats)
        if baseline is None:
            step.baseline_p99_ms = step.p_ms(99)
        self.steps.append(step)
        self.progress.update()
        return step

    def drive(
        self,
        config: Config,
        proxy: GatewayProcess | None,
        upstream: UpstreamProcess,
        sessions: int,
        stop: Stop,
        phase: str,
    ) -> LoadStats:
        load = turns(config, proxy, upstream, self.args, phase, stop, sessions)
        return asyncio.run(load, loop_factory=event_loop_factory(True))

    def problems(
        self, config: Config, proxy: GatewayProcess | None, upstream: UpstreamProcess, phase: str, stats: LoadStats
    ) -> list[str]:
        ledger = upstream.ledger(model(config, phase))
        found, responses = accounting_problems(config, ledger, model(config, phase), stats.usages, proxy)
        lost = stats.sessions + responses * frames_per_response(self.args) - stats.server_frames
        if lost:
            found.insert(0, f"{lost} frames lost")
        if stats.failures:
            found.insert(0, f"{len(stats.failures)} sessions failed ({stats.failures[0]})")
        return found


def _load_limit(step: Step) -> str:
    if step.problems:
        return f"missed: {'; '.join(step.problems)}"
    return f"took {step.load_cpu:.0%} of the load's CPU: the load generator's limit, not a relay's"


def _alternate[T](configs: list[T], round_number: int) -> list[T]:
    """Forward in odd rounds, backward in even ones, so that no configuration always runs first."""
    return configs if round_number % 2 else configs[::-1]


class Search:
    """Per configuration: up the ramp until a count is missed, then `bisect` steps between the last
    count met and the first missed. On a shared machine a neighbour's burst can spoil one step, so a
    miss is tried again `retries` times, in the next round, before it counts."""

    def __init__(self, ramp: Sequence[int], bisect: int, retries: int) -> None:
        self.ramp = list(ramp)
        self.bisect = bisect
        self.retries = retries
        self.tried_again: dict[int, int] = {}  # count -> times
        self.retry: int | None = None  # a missed count to try again
        self.met: int | None = None  # largest count met
        self.missed: int | None = None  # smallest count missed

    def next(self) -> int | None:
        if self.retry is not None:
            return self.retry
        if self.missed is None:
            higher = [n for n in self.ramp if self.met is None or n > self.met]
            return higher[0] if higher else None
        low = self.met or 0
        if self.bisect <= 0 or self.missed - low <= 1:
            return None
        return (low + self.missed) // 2

    def record(self, sessions: int, met: bool) -> None:
        if not met and self.tried_again.get(sessions, 0) < self.retries:
            self.tried_again[sessions] = self.tried_again.get(sessions, 0) + 1
            self.retry = sessions
            return
        self.retry = None
        if self.missed is not None:
            self.bisect -= 1
        if met:
            self.met = max(self.met or 0, sessions)
        else:
            self.missed = sessions if self.missed is None else min(self.missed, sessions)


# --- the report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capacity:
    """A configuration's result: the largest count met, and the first count missed (if any)."""

    config: str
    sessions: int  # 0: not even the first count
    missed: Step | None  # the smallest count missed
    bounded: bool  # the ramp ended before this configuration missed: its capacity is at least this
    projected: float | None  # sessions per core at 100 % CPU, median over the steps met

    def cell(self) -> str:
        return f"≥ {self.sessions}" if self.bounded else str(self.sessions)


def capacities(steps: Sequence[Step], configs: Sequence[str]) -> list[Capacity]:
    found = []
    for name in configs:
        if name == DIRECT.name:
            continue
        mine = [s for s in steps if s.config == name]
        met = {s.sessions for s in mine if s.met}  # a count met once is met (a retry passed)
        missed = sorted((s for s in mine if s.sessions not in met), key=lambda s: s.sessions)
        first = [s for s in missed if s.sessions == missed[0].sessions][-1] if missed else None  # its last try
        below = [n for n in met if first is None or n < first.sessions]
        projected = [p for s in mine if s.met and (p := s.projected) is not None]
        median = statistics.median(projected) if projected else None
        found.append(Capacity(name, max(below, default=0), first, first is None, median))
    return found


def _ms(value: float | None, sign: bool = False) -> str:
    return "—" if value is None else f"{value:+.1f}" if sign else f"{value:.1f}"


def capacity_table(results: Sequence[Capacity]) -> str:
    by_name = {c.config: c for c in results}
    serve = by_name.get(SERVE.name)
    mitmdump = by_name.get(MITMDUMP.name)
    rows = []
    for c in results:
        vs_serve = f"{c.sessions / serve.sessions:.2f}" if serve and serve.sessions else "—"
        vs_mitmdump = f"{c.sessions / mitmdump.sessions:.2f}" if mitmdump and mitmdump.sessions else "—"
        first_miss = f"{c.missed.sessions}: {c.missed.why_missed()}" if c.missed else "—"
        projected = "—" if c.projected is None else f"{c.projected:.0f}"
        rows.append([f"**{c.config}**", f"**{c.cell()}**", vs_serve, vs_mitmdump, projected, first_miss])
    header = [
        "configuration", "sessions on one core", "÷ serve's", "÷ mitmdump's",
        "projected from CPU (sessions ÷ CPU share)", "first count missed: why",
    ]  # fmt: skip
    return table(header, rows)


def targets_table(results: Sequence[Capacity]) -> str:
    by_name = {c.config: c for c in results}
    rows = []
    for config, reference, ratio in RATIOS:
        mine, theirs = by_name.get(config.name), by_name.get(reference.name)
        if mine is None or theirs is None or not theirs.sessions:
            continue
        measured = mine.sessions / theirs.sessions
        bounded = " (a bound: the ramp ended first)" if mine.bounded or theirs.bounded else ""
        verdict = "met" if measured >= ratio else "**missed**"
        rows.append([f"{config.name} ÷ {reference.name}", f"{measured:.2f}{bounded}", f"≥ {ratio:g}", verdict])
    return table(["target (capacity ratio)", "measured", "goal", ""], rows)


def steps_table(steps: Sequence[Step]) -> str:
    rows = []
    for s in sorted(steps, key=lambda s: ([c.name for c in CONFIGS].index(s.config), s.sessions)):
        rows.append(
            [
                s.config,
                str(s.sessions),
                _ms(s.p_ms(50)),
                _ms(s.p_ms(99)),
                _ms(s.added_p99_ms, sign=True) if s.config != DIRECT.name else "—",
                "—" if s.relay_cpu is None else f"{s.relay_cpu:.0%}",
                "—" if s.projected is None else f"{s.projected:.0f}",
                f"{s.load_cpu:.0%}",
                _ms(s.lateness_p99_ms),
                f"{s.stats.server_frames:,}",
                "; ".join(s.problems) or "exact, none lost",
                "—" if s.config == DIRECT.name else "met" if s.met else "**missed**",
            ]
        )
    header = [
        "configuration", "sessions", "latency p50 (ms)", "p99 (ms)", "p99 − baseline's (ms)",
        "relay CPU (of 1 core)", "projected sessions per core", "load CPU (of its core)",
        "load timing error p99 (ms)", "server frames", "frames and accounting", "target",
    ]  # fmt: skip
    return table(header, rows)


def document(ramp: Ramp, argv: Sequence[str], seconds: float, load: tuple[float, ...]) -> str:
    args = ramp.args
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["scripts/bench", "--capacity", *argv])
    results = capacities(ramp.steps, args.configs)
    stopped = f"\n\n**The ramp ended early**: {ramp.stopped}." if ramp.stopped else ""
    descriptions = {c.name: c.description for c in CONFIGS} | {DIRECT.name: "the baseline: no relay"}
    listed = "\n".join(f"- **{name}**: {descriptions[name]}" for name in args.configs)
    return f"""
Measured {when} with `{command}` in {seconds:.0f} s on a **shared** machine (other work may run
beside it; load average {load[0]:.2f} at the start): {machine()}. Pinned: {ramp.cpus.describe()}.

A turn: the user speaks {args.appends} appends of {args.append_ms:g} ms ({pcm16_bytes(args.append_ms)} bytes PCM16),
one every {args.append_ms:g} ms, then `response.create`; the simulator answers with {args.audio_deltas} audio
deltas of {args.delta_ms:g} ms and {args.transcript_deltas} transcript deltas, one every {args.delta_ms:g} ms, and
`response.done`. Sessions start spread over one turn ({turn_seconds(args):g} s) and take turns for
{args.seconds:g} s per step. Counts tried: {", ".join(map(str, args.ramp))}, then {args.bisect} bisection steps;
a missed count is tried again {args.retries} time(s) in the next round. Target per step: p99 latency per frame at most
{ADDED_P99_MS:g} ms over the baseline's at the same count in the same round, no frame lost, no session failed,
accounting exact. No compression on either leg.

{listed}{stopped}

### Sessions per core (the largest count that met the target)

{capacity_table(results)}

{targets_table(results)}

![p99 latency against sessions]({PLOT_NAME})

### Every step

{steps_table(ramp.steps)}
"""


def plot(steps: Sequence[Step], configs: Sequence[str], path: Path) -> None:
    """p99 latency per frame against sessions, every configuration; the target over the baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(9, 5))
    for name in configs:
        points = sorted((s.sessions, p99) for s in steps if s.config == name and (p99 := s.p_ms(99)) is not None)
        if points:
            axes.plot([n for n, _ in points], [p for _, p in points], marker="o", label=name)
    baseline = sorted({s.sessions: s.p_ms(99) for s in steps if s.config == DIRECT.name}.items())
    if baseline:
        xs = [n for n, _ in baseline]
        target = [(p or 0) + ADDED_P99_MS for _, p in baseline]
        axes.plot(xs, target, "k--", label=f"target: baseline + {ADDED_P99_MS:g} ms")
    axes.set(
        xscale="log", yscale="log", xlabel="concurrent voice sessions", ylabel="p99 latency per frame (ms)",
        title="Live voice sessions through one relay core",
    )  # fmt: skip
    axes.grid(alpha=0.3, which="both")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def simulator(args: argparse.Namespace) -> UpstreamProcess:
    """The upstream of the turn `args` sizes, in a child process (uvloop, no compression, the greeting's delay);
    the profiler and the paired benchmark take it too."""
    return UpstreamProcess(
        uvloop=True,
        seed=args.seed,
        audio_bytes=pcm16_bytes(args.delta_ms),
        transcript_deltas=args.transcript_deltas,
        compression=None,
        greeting_delay=GREETING_DELAY,
    )


def run(args: argparse.Namespace) -> tuple[Ramp, float]:
    """The ramp, with this process and the simulator on the load's CPUs and every relay on its own."""
    cpus = Cpus.split()
    pin(os.getpid(), cpus.load)
    ramp = Ramp(args, cpus)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-capacity-") as tmp, simulator(args) as upstream:
        ramp.run(upstream, Workdir.create(Path(tmp)))
    return ramp, time.perf_counter() - started


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    for name in args.configs:
        if name in INSTALLS:
            try:
                INSTALLS[name]()  # before the clock starts: the first time, this downloads the peer
            except RuntimeError as e:
                print(f"scripts/bench: {e}", file=sys.stderr)
                return 2
    load = os.getloadavg()
    ramp, seconds = run(args)
    generated = document(ramp, argv, seconds, load)
    output: Path = args.output
    existing = output.read_text(encoding="utf-8") if output.exists() else None
    output.write_text(splice(existing, generated, BEGIN, END), encoding="utf-8")
    plot(ramp.steps, args.configs, output.parent / PLOT_NAME)
    print(generated)
    print(f"written: {output} and {output.parent / PLOT_NAME}")
    return 0
