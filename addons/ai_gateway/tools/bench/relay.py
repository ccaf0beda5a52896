"""scripts/bench: what the gateway costs on top of mitmproxy, measured side by side in one run.

These machines are shared and noisy, so absolute figures drift from run to run; what holds is a
comparison made within one run. Every relay figure is therefore measured for all configurations
in the same run, round after round, in serpentine order (A B C D, D C B A, ...) so that a linear
drift in machine load weighs on each configuration alike, and the gateway is reported as a ratio
to bare mitmdump. Memory is measured on fresh processes, and the per-frame hook cost in-process.

Every run also checks the accounting: the response.done usage each client received equals what
the simulated upstream ledgered, and for the gateway configurations /metrics equals
harness.expected_samples of that ledger. A difference makes the run fail. The peer, LiteLLM's
proxy, has its own usage log compared with the ledger too, and reported without failing the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import inspect
import json
import operator
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil
import yaml
from mitmproxy.test import taddons, tflow
from mitmproxy.websocket import WebSocketMessage
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from ai_gateway.config.policy import DEFAULT_POLICY, load_policy
from ai_gateway.proxy.addon import Gateway
from ai_gateway.tools.bench.litellm import LITELLM_VERSION, LitellmProcess, Metered, install
from ai_gateway.tools.harness import GatewayProcess, expected_samples, scrape, select, usage_only
from ai_gateway.tools.loadgen import (
    LoadStats,
    Stop,
    Traffic,
    UpstreamProcess,
    audio_base64,
    canonical_usage,
    drive,
    pcm16_bytes,
)
from ai_gateway.tools.simulators.realtime import EXAMPLE_USAGE, GA, SentUsage

ROOT = Path(__file__).resolve().parents[4]
BENCHMARKS = ROOT / "BENCHMARKS.md"
PLOT_NAME = "bench-rss.png"
BEGIN = "<!-- bench:begin: written by scripts/bench; text outside these markers is kept -->"
END = "<!-- bench:end -->"
MB = 1e6
RSS_INTERVAL = 0.2  # seconds between RSS samples of a long session
SETTLE = 0.3  # seconds for mitmproxy to finish a closed flow before its RSS is read

# The targets of issue #5; shown in BENCHMARKS.md, never asserted by timed tests.
THROUGHPUT_RATIO = 0.97
ADDED_P99_MS = 0.5
HOOK_DELTA_US = 3.0
HOOK_DONE_US = 30.0
SOAK_GROWTH_MB = 20.0
CHURN_GROWTH_MB = 2.0  # "no growth after the first session", allowing for allocator noise


# --- configurations ---------------------------------------------------------------------------


class BareMitmdump(GatewayProcess):
    """mitmdump in reverse mode without the gateway script: the relay's own cost."""

    def command(self) -> list[str]:
        return [
            self.tool, "--mode", f"reverse:{self.upstream}",
            "--listen-host", "127.0.0.1", "-p", str(self.port), *self.args,
        ]  # fmt: skip

    def ready(self) -> bool:
        """No metrics endpoint to probe: mitmproxy's own startup line tells."""
        return " listening at " in self.log()


@dataclass(frozen=True)
class Workdir:
    """Files some configurations start their proxy with, written to the run's temp directory."""

    policy: Path  # the default policy, keeping compression
    empty_addon: Path  # a script whose websocket_message does nothing
    directory: Path  # where a proxy writes its own files (LiteLLM: its config and usage log)

    @classmethod
    def create(cls, directory: Path) -> Workdir:
        empty_addon = directory / "empty_addon.py"
        source = inspect.getsource(EmptyHook)  # the same floor as the microbenchmark's
        empty_addon.write_text(f"from __future__ import annotations\n\n\n{source}\n\naddons = [EmptyHook()]\n")
        return cls(keep_compression_policy(directory), empty_addon, directory)


@dataclass(frozen=True)
class Config:
    name: str
    description: str
    proxy: Callable[[str, Workdir], GatewayProcess] | None  # (upstream URL, files) -> proxy; None: direct
    metered: bool = False


DIRECT = Config("direct", "the client talks to the simulator, no proxy", None)
MITMDUMP = Config(
    "mitmdump",
    "bare `mitmdump --mode reverse:…`, no `-s`: the ceiling",
    lambda upstream, work: BareMitmdump(upstream),
)
GATEWAY = Config(
    "gateway",
    "`mitmdump -s addons/gateway.py`, default policy (removes `sec-websocket-extensions`: no compression)",
    lambda upstream, work: GatewayProcess(upstream),
    metered=True,
)
GATEWAY_DEFLATE = Config(
    "gateway-deflate",
    "the gateway with the default policy minus that removal: permessage-deflate on both legs, as mitmdump",
    lambda upstream, work: GatewayProcess(upstream, options={"gateway_policy": str(work.policy)}),
    metered=True,
)
SERVE = Config(
    "serve",
    "`scripts/serve` (the lean launcher: only the addons a reverse gateway needs, uvloop), default policy",
    lambda upstream, work: GatewayProcess(upstream, launcher="serve"),
    metered=True,
)
# Not run by default: where the gateway misses a relay target, it tells how much of the cost any
# addon has (mitmproxy dispatching the hook to a script) and how much is the gateway's own.
EMPTY_ADDON = Config(
    "empty-addon",
    "`mitmdump -s` an addon whose `websocket_message` does nothing: what any addon costs",
    lambda upstream, work: BareMitmdump(upstream, args=["-s", str(work.empty_addon)]),
)
# The peer (issue #8), not run by default: its first run installs LiteLLM from PyPI (about 730 MB),
# it adds about 100 s to the 6 minutes of a default run, and the gateway's own targets do not need it.
LITELLM = Config(
    "litellm",
    f"LiteLLM {LITELLM_VERSION}'s proxy, `litellm --config … --num_workers 1` (in its own venv, no database): "
    "its `/v1/realtime` relay, every model routed to the simulator as `openai/*`; permessage-deflate on both "
    "legs (its defaults); metering from its own success callback, at session close",
    lambda upstream, work: LitellmProcess(upstream, work.directory),
)
CONFIGS = (DIRECT, MITMDUMP, EMPTY_ADDON, GATEWAY, GATEWAY_DEFLATE, SERVE, LITELLM)
DEFAULT_CONFIGS = (DIRECT, MITMDUMP, GATEWAY, GATEWAY_DEFLATE, SERVE)
# Measured in this order (and back): mitmdump sits next to each gateway, so the pairs that make
# the ratios are measured one right after the other.
RUN_ORDER = (DIRECT, GATEWAY, MITMDUMP, GATEWAY_DEFLATE, SERVE, LITELLM, EMPTY_ADDON)


def keep_compression_policy(directory: Path) -> Path:
    """The default policy without its `remove: [sec-websocket-extensions]`, in a copy of its directory
    (so that files it names relative to itself, such as the price list, are found)."""
    copy = Path(shutil.copytree(DEFAULT_POLICY.parent, directory / DEFAULT_POLICY.parent.name))
    document = yaml.safe_load(DEFAULT_POLICY.read_text(encoding="utf-8"))
    for route in document["routes"].values():
        request = route.get("request", {}) if isinstance(route, dict) else {}
        if "remove" in request:
            request["remove"] = [h for h in request["remove"] if h.lower() != "sec-websocket-extensions"]
    path = copy / f"keep-compression-{DEFAULT_POLICY.name}"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    load_policy(path)  # the gateway must accept it; fail here rather than in mitmdump's log
    return path


def serpentine(configs: Sequence[Config], rounds: int) -> Iterator[tuple[int, Config]]:
    """Forward on even rounds, backward on odd ones: a linear drift averages out over each pair."""
    for r in range(rounds):
        for config in configs if r % 2 == 0 else reversed(configs):
            yield r, config


# --- measurements -------------------------------------------------------------------------------


@dataclass
class RelayRound:
    """One configuration in one round: saturating throughput, then latency at a paced load."""

    throughput: LoadStats
    latency: LoadStats
    cpu_seconds: float | None  # of the proxy process during the throughput load


@dataclass
class MemoryRun:
    soak: list[tuple[float, float]] = field(default_factory=list)  # (seconds, RSS MB) during the long session
    soak_baseline: float = 0.0  # RSS MB before it, after a one-turn warm-up session
    soak_final: float = 0.0  # RSS MB after it closed
    soak_megabytes: float = 0.0  # payload relayed, both directions
    churn: list[float] = field(default_factory=list)  # RSS MB after each short session closed

    @property
    def soak_peak(self) -> float:
        return max((rss for _, rss in self.soak), default=self.soak_baseline)


@dataclass(frozen=True)
class HookCost:
    frame: str
    gateway_us: float
    empty_us: float
    target_us: float | None


@dataclass
class Results:
    relay: dict[str, list[RelayRound]] = field(default_factory=dict)
    memory: dict[str, MemoryRun] = field(default_factory=dict)
    hooks: list[HookCost] = field(default_factory=list)
    accounting: dict[str, list[str]] = field(default_factory=dict)  # config -> problems (empty: exact)
    responses: dict[str, int] = field(default_factory=dict)  # config -> response.done checked
    peer: dict[str, Metered] = field(default_factory=dict)  # config -> the peer's own usage log against the ledger
    seconds: float = 0.0


def rss_mb(process: psutil.Process) -> float:
    return float(process.memory_info().rss) / MB


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def proxy_process(proxy: GatewayProcess | None) -> psutil.Process | None:
    return None if proxy is None or proxy.process is None else psutil.Process(proxy.process.pid)


@dataclass(frozen=True)
class Address:
    """Where the clients connect (a proxy, or the simulator), with the headers that proxy wants."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)

    def drive(self, model: str, traffic: Traffic, stop: Stop, **options: Any) -> Awaitable[LoadStats]:
        return drive(self.url, model, traffic, stop, headers=self.headers, **options)


def address(proxy: GatewayProcess | None, upstream: UpstreamProcess) -> Address:
    """The proxy's address, or the simulator's when there is none; LiteLLM also wants its key."""
    if proxy is None:
        return Address(upstream.url)
    return Address(proxy.url, proxy.headers if isinstance(proxy, LitellmProcess) else {})


def relay_round(to: Address, model: str, proxy: psutil.Process | None, args: argparse.Namespace) -> RelayRound:
    """Closed-loop sessions as fast as the relay goes, then paced sessions streaming audio in real time."""
    before = cpu_seconds(proxy) if proxy else 0.0
    throughput = asyncio.run(
        to.drive(model, traffic(args), Stop(seconds=args.seconds), sessions=args.sessions, seed=args.seed)
    )
    used = cpu_seconds(proxy) - before if proxy else None
    paced = traffic(args, append_interval=args.append_ms / 1000)
    turn = paced.appends * paced.append_interval
    latency = asyncio.run(
        to.drive(model, paced, Stop(seconds=args.seconds), sessions=args.latency_sessions, seed=args.seed, spread=turn)
    )
    return RelayRound(throughput, latency, used)


def traffic(args: argparse.Namespace, append_interval: float = 0.0) -> Traffic:
    return Traffic(
        appends=args.appends, append_ms=args.append_ms, audio_deltas=args.audio_deltas, append_interval=append_interval
    )


async def soak(to: Address, model: str, process: psutil.Process, args: argparse.Namespace, run: MemoryRun) -> list[str]:
    """One session relaying `--soak-mb` of audio, RSS sampled throughout. Returns the usage received."""
    warm = await to.drive(model, traffic(args), Stop(turns=1), seed=args.seed)
    await asyncio.sleep(SETTLE)
    run.soak_baseline = rss_mb(process)
    started = time.perf_counter()

    async def sample() -> None:
        while True:
            run.soak.append((time.perf_counter() - started, rss_mb(process)))
            await asyncio.sleep(RSS_INTERVAL)

    sampler = asyncio.create_task(sample())
    try:
        stats = await to.drive(model, traffic(args), Stop(megabytes=args.soak_mb), seed=args.seed)
    finally:
        sampler.cancel()
    run.soak.append((time.perf_counter() - started, rss_mb(process)))
    await asyncio.sleep(SETTLE)
    run.soak_final = rss_mb(process)
    run.soak_megabytes = stats.bytes / MB
    return warm.usages + stats.usages


async def churn(
    to: Address, model: str, process: psutil.Process, args: argparse.Namespace, run: MemoryRun
) -> list[str]:
    """`--churn-sessions` short sessions opened and closed one after another; RSS after each."""

    async def sample(_: int) -> None:
        await asyncio.sleep(SETTLE)
        run.churn.append(rss_mb(process))

    stop = Stop(turns=args.churn_turns)
    stats = await to.drive(
        model, traffic(args), stop, sessions=args.churn_sessions, seed=args.seed, after_session=sample
    )
    return stats.usages


MEMORY_PHASES = {"soak": soak, "churn": churn}


def accounting_problems(
    config: Config, ledger: Sequence[SentUsage], model: str, received: Sequence[str], proxy: GatewayProcess | None
) -> tuple[list[str], int]:
    """Relayed exactly (clients got every usage the upstream sent) and, through a gateway, metered exactly."""
    sent = sorted(canonical_usage(entry.usage) for entry in ledger if entry.kind == "response")
    problems = []
    if sorted(received) != sent:
        problems.append(f"{model}: clients received {len(received)} response.done, the upstream sent {len(sent)}")
    if config.metered and proxy is not None:
        metrics = usage_only(select(scrape(proxy.metrics_url), gen_ai_request_model=model))
        if metrics != expected_samples(ledger):
            problems.append(f"{model}: /metrics differs from the upstream's ledger")
    return problems, len(sent)


# --- the hook microbenchmark --------------------------------------------------------------------


class EmptyHook:
    """The floor: a websocket_message hook that does nothing, called the same way."""

    def websocket_message(self, flow: Any) -> None:
        pass


def realtime_frames(args: argparse.Namespace) -> dict[str, WebSocketMessage]:
    """The frames a voice session is made of, as the simulator and a client send them."""
    rng = random.Random(args.seed)
    where = {"response_id": "resp_1", "item_id": "item_2", "output_index": 0, "content_index": 0}
    response = {"object": "realtime.response", "id": "resp_1", "status": "completed", "metadata": None}
    delta = {"type": GA.audio_delta, "event_id": "event_7", **where, "delta": audio_base64(rng, args.delta_ms)}
    done = {"type": "response.done", "event_id": "event_9", "response": {**response, "usage": EXAMPLE_USAGE}}
    events = {
        "server audio delta": (False, delta),
        "client audio append": (True, json.loads(traffic(args).append(rng))),
        "response.done": (False, done),
    }
    return {
        name: WebSocketMessage(1, from_client, json.dumps(event).encode())
        for name, (from_client, event) in events.items()
    }


def time_hook(hook: Callable[[Any], None], flow: Any, message: WebSocketMessage, iterations: int) -> float:
    """Microseconds per call, the median of 5 repeats; each call sees `message` appended as mitmproxy does."""
    messages = flow.websocket.messages
    per_call = []
    for _ in range(5):
        started = time.perf_counter_ns()
        for _ in range(iterations):
            messages.append(message)
            hook(flow)
        per_call.append((time.perf_counter_ns() - started) / iterations / 1000)
        del messages[:]
    return statistics.median(per_call)


def hook_costs(args: argparse.Namespace) -> list[HookCost]:
    """Gateway.websocket_message on a Realtime session in mitmproxy's test context, against an empty hook."""
    gateway, empty = Gateway(), EmptyHook()
    targets = {"server audio delta": HOOK_DELTA_US, "response.done": HOOK_DONE_US}
    with taddons.context(gateway) as context:
        context.configure(gateway, gateway_metrics_port=0, gateway_policy=str(DEFAULT_POLICY))
        flow = tflow.twebsocketflow()
        assert flow.websocket is not None
        flow.request.path = "/v1/realtime?model=gpt-realtime"
        del flow.websocket.messages[:]
        gateway.websocket_start(flow)
        session = {"type": "session.created", "event_id": "event_1", "session": {"model": "gpt-realtime-2025-08-28"}}
        flow.websocket.messages.append(WebSocketMessage(1, False, json.dumps(session).encode()))
        gateway.websocket_message(flow)
        costs = []
        for name, message in realtime_frames(args).items():
            # response.done bills on every call (tens of µs), so fewer calls take as long.
            iterations = max(1, args.hook_iterations // (10 if name == "response.done" else 1))
            gateway_us = time_hook(gateway.websocket_message, flow, message, iterations)
            costs.append(
                HookCost(
                    name, gateway_us, time_hook(empty.websocket_message, flow, message, iterations), targets.get(name)
                )
            )
            if name == "response.done":
                require_billed(gateway, 5 * iterations)
        gateway.websocket_end(flow)
    return costs


def require_billed(gateway: Gateway, responses: int) -> None:
    """A hook that silently stopped metering (a policy not loaded, a failing meter) would time as
    fast as an empty one: make sure every response.done was counted."""
    text = generate_latest(gateway.metrics.registry).decode()
    counted = sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.endswith("_gen_ai_client_responses_total")
    )
    if counted != responses:
        raise RuntimeError(f"the hook microbenchmark metered {counted:g} of {responses} response.done frames")


# --- running it ---------------------------------------------------------------------------------


@contextlib.contextmanager
def endpoint(config: Config, upstream: UpstreamProcess, work: Workdir) -> Iterator[GatewayProcess | None]:
    """The configuration's proxy in front of the upstream, running for the block (None: direct)."""
    if config.proxy is None:
        yield None
        return
    with config.proxy(upstream.url, work) as proxy:
        yield proxy


class Bench:
    """One run: every phase, every configuration, results and accounting collected as it goes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.progress = tqdm(total=self.steps(args), unit="step", file=sys.stderr, dynamic_ncols=True)
        self.configs = [c for c in RUN_ORDER if c.name in args.configs]
        self.results = Results()

    @staticmethod
    def steps(args: argparse.Namespace) -> int:
        """For the progress bar: the microbenchmark, a warm-up and the rounds per configuration, and
        two memory phases per proxy."""
        configs = [c for c in CONFIGS if c.name in args.configs]
        proxied = sum(c.proxy is not None for c in configs)
        return 1 + len(configs) * (1 + int(args.rounds)) + 2 * proxied

    def step(self, description: str) -> None:
        self.progress.set_description(description)

    def done(self) -> None:
        self.progress.update()

    def run(self) -> Results:
        with self.progress:
            return self.measure()

    def measure(self) -> Results:
        started = time.perf_counter()
        self.step("hook microbenchmark")
        self.results.hooks = hook_costs(self.args)
        self.done()
        args = self.args
        simulator = UpstreamProcess(
            seed=args.seed, audio_bytes=pcm16_bytes(args.delta_ms), transcript_deltas=args.transcript_deltas
        )
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp, simulator as upstream:
            work = Workdir.create(Path(tmp))
            self.relay(upstream, work)
            for config in self.configs:
                if config.proxy is not None:
                    self.memory(config, upstream, work)
        self.results.seconds = time.perf_counter() - started
        return self.results

    def relay(self, upstream: UpstreamProcess, work: Workdir) -> None:
        """All configurations run at once (idle but for the one measured), alternated round by round."""
        args = self.args
        with contextlib.ExitStack() as stack:
            proxies = {c.name: stack.enter_context(endpoint(c, upstream, work)) for c in self.configs}
            received: dict[str, list[str]] = {c.name: [] for c in self.configs}
            for config in self.configs:  # the first sessions through a fresh process run slower
                self.step(f"warm-up {config.name}")
                to = address(proxies[config.name], upstream)
                warm = asyncio.run(to.drive(model(config, "relay"), traffic(args), Stop(turns=2), sessions=2))
                received[config.name] += warm.usages
                self.done()
            for r, config in serpentine(self.configs, args.rounds):
                self.step(f"round {r + 1}/{args.rounds} {config.name}")
                proxy = proxies[config.name]
                measured = relay_round(address(proxy, upstream), model(config, "relay"), proxy_process(proxy), args)
                self.results.relay.setdefault(config.name, []).append(measured)
                received[config.name] += measured.throughput.usages + measured.latency.usages
                self.done()
            for config in self.configs:
                self.check(config, upstream, "relay", received[config.name], proxies[config.name])

    def memory(self, config: Config, upstream: UpstreamProcess, work: Workdir) -> None:
        """A long session and a churn of short ones, each on a fresh process so that baselines are clean."""
        run = MemoryRun()
        for phase, measure in MEMORY_PHASES.items():
            self.step(f"{phase} {config.name}")
            with endpoint(config, upstream, work) as proxy:
                process = proxy_process(proxy)
                assert proxy is not None and process is not None
                received = asyncio.run(measure(address(proxy, upstream), model(config, phase), process, self.args, run))
                self.check(config, upstream, phase, received, proxy)
            self.done()
        self.results.memory[config.name] = run

    def check(
        self, config: Config, upstream: UpstreamProcess, phase: str, received: list[str], proxy: GatewayProcess | None
    ) -> None:
        ledger = upstream.ledger(model(config, phase))
        problems, responses = accounting_problems(config, ledger, model(config, phase), received, proxy)
        self.results.accounting.setdefault(config.name, []).extend(problems)
        self.results.responses[config.name] = self.results.responses.get(config.name, 0) + responses
        if isinstance(proxy, LitellmProcess):  # the peer's own metering: reported, never a failure
            metered = proxy.metered(model(config, phase), ledger)
            self.results.peer[config.name] = self.results.peer.get(config.name, Metered()) + metered


def model(config: Config, phase: str) -> str:
    """A request model per configuration and phase, so that each reads only its own ledger and metrics."""
    return f"bench-{phase}-{config.name}"


# --- the report ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: a value that was actually observed."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def spread(values: Sequence[float], digits: int = 2) -> str:
    """The median, with the range over rounds when there is more than one."""
    middle = f"{statistics.median(values):.{digits}f}"
    return middle if len(values) < 2 else f"{middle} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


@dataclass(frozen=True)
class Target:
    goal: str
    value: float
    limit: float
    unit: str = ""
    at_least: bool = False  # the limit is a floor, not a ceiling

    @property
    def met(self) -> bool:
        return self.value >= self.limit if self.at_least else self.value <= self.limit


Figure = Callable[[RelayRound], float | None]


class Report:
    """Figures derived from the results: medians over rounds of per-round figures, and every
    comparison (ratio to mitmdump, latency added to direct) made between runs of the same round."""

    def __init__(self, results: Results) -> None:
        self.results = results

    def per_round(self, name: str, figure: Figure) -> list[float]:
        return [value for r in self.results.relay.get(name, []) if (value := figure(r)) is not None]

    def paired(self, name: str, base: Config, figure: Figure, combine: Callable[[float, float], float]) -> list[float]:
        """`combine(figure of name, figure of base)` round by round: both measured within the same minute."""
        pairs = zip(self.results.relay.get(name, []), self.results.relay.get(base.name, []), strict=False)
        return [combine(a, b) for x, y in pairs if (a := figure(x)) is not None and (b := figure(y)) is not None]

    def ratios(self, name: str, figure: Figure) -> list[float]:
        return self.paired(name, MITMDUMP, figure, operator.truediv)

    def accounting(self, name: str) -> str:
        problems = self.results.accounting.get(name)
        if problems is None:
            return "—"
        if problems:
            return f"MISMATCH: {'; '.join(problems)}"
        relayed = f"exact ({self.results.responses.get(name, 0)} responses)"
        metered = self.results.peer.get(name)
        return relayed if metered is None else f"relay {relayed}; {metered.summary()}"

    def relay_table(self) -> str:
        rows = []
        for name, _ in ordered(self.results.relay):
            rows.append(
                [
                    f"**{name}**",
                    spread(self.per_round(name, messages_per_second), 0),
                    spread(self.per_round(name, lambda r: r.throughput.megabytes_per_second), 1),
                    _or_dash(self.ratios(name, messages_per_second)),
                    *(_or_dash(self.per_round(name, latency_ms(q))) for q in (50, 99)),
                    *(_or_dash(self.paired(name, DIRECT, latency_ms(q), operator.sub)) for q in (50, 99)),
                    _or_dash(self.per_round(name, cpu_per_10k)),
                    _or_dash(self.ratios(name, cpu_per_10k)),
                    self.accounting(name),
                ]
            )
        header = [
            "configuration", "msg/s", "MB/s", "msg/s vs mitmdump", "latency p50 (ms)", "p99 (ms)",
            "added p50 vs direct (ms)", "added p99 vs direct (ms)", "CPU s / 10k frames", "CPU vs mitmdump",
            "accounting (all phases)",
        ]  # fmt: skip
        return table(header, rows)

    def memory_table(self) -> str:
        rows = []
        for name, run in ordered(self.results.memory):
            first, last = (run.churn[0], run.churn[-1]) if run.churn else (0.0, 0.0)
            rows.append(
                [
                    f"**{name}**",
                    f"{run.soak_megabytes:.0f}",
                    f"{run.soak_baseline:.1f}",
                    f"{run.soak_peak:.1f}",
                    f"{run.soak_final:.1f}",
                    f"**{run.soak_peak - run.soak_baseline:+.1f}**",
                    f"{first:.1f}",
                    f"{last:.1f}",
                    f"**{last - first:+.1f}**",
                ]
            )
        sessions = len(next(iter(self.results.memory.values())).churn) if self.results.memory else 0
        header = [
            "configuration", "long session: MB relayed", "RSS before (MB)", "peak (MB)", "after close (MB)",
            "growth (peak − before)", "churn: RSS after session 1 (MB)", f"after session {sessions} (MB)",
            "growth after the first",
        ]  # fmt: skip
        return table(header, rows)

    def hook_table(self) -> str:
        rows = [
            [
                cost.frame,
                f"{cost.gateway_us:.2f}",
                f"{cost.empty_us:.2f}",
                f"**{cost.gateway_us - cost.empty_us:.2f}**",
                f"< {cost.target_us:g}" if cost.target_us else "—",
            ]
            for cost in self.results.hooks
        ]
        header = ["frame", "Gateway.websocket_message (µs)", "empty hook (µs)", "gateway − empty (µs)", "target (µs)"]
        return table(header, rows)

    def targets(self) -> list[Target]:
        found = []
        for name in (c.name for c in CONFIGS if c.metered):
            if ratios := self.ratios(name, messages_per_second):
                found.append(
                    Target(f"{name}: msg/s ÷ mitmdump's", statistics.median(ratios), THROUGHPUT_RATIO, "", True)
                )
            if added := self.paired(name, MITMDUMP, latency_ms(99), operator.sub):
                found.append(Target(f"{name}: p99 latency − mitmdump's", statistics.median(added), ADDED_P99_MS, " ms"))
            if (run := self.results.memory.get(name)) is not None:
                growth = run.soak_peak - run.soak_baseline
                found.append(
                    Target(
                        f"{name}: RSS growth, one {run.soak_megabytes:.0f} MB session", growth, SOAK_GROWTH_MB, " MB"
                    )
                )
                if run.churn:
                    growth = run.churn[-1] - run.churn[0]
                    goal = f"{name}: RSS growth after the first of {len(run.churn)} sessions"
                    found.append(Target(goal, growth, CHURN_GROWTH_MB, " MB"))
        for cost in self.results.hooks:
            if cost.target_us is not None:
                found.append(Target(f"hook cost, {cost.frame}", cost.gateway_us - cost.empty_us, cost.target_us, " µs"))
        return found

    def targets_table(self) -> str:
        rows = [
            [
                t.goal,
                f"{t.value:.2f}{t.unit}",
                f"{'≥' if t.at_least else '≤'} {t.limit:g}{t.unit}",
                "met" if t.met else "**missed**",
            ]
            for t in self.targets()
        ]
        return table(["target", "measured", "goal", ""], rows)


def ordered[T](by_config: dict[str, T]) -> list[tuple[str, T]]:
    """Results in the order of CONFIGS (they were collected in the order they ran)."""
    return [(c.name, by_config[c.name]) for c in CONFIGS if c.name in by_config]


def messages_per_second(r: RelayRound) -> float:
    return r.throughput.frames_per_second


def latency_ms(q: float) -> Figure:
    """The q-th percentile of a round's latency samples."""
    return lambda r: percentile(r.latency.latencies, q) * 1000 if r.latency.latencies else None


def cpu_per_10k(r: RelayRound) -> float | None:
    return None if r.cpu_seconds is None else r.cpu_seconds / r.throughput.frames * 10_000


def _or_dash(values: Sequence[float]) -> str:
    return spread(values) if values else "—"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> str:
    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {memory:.0f} GiB; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, mitmproxy {version('mitmproxy')}, websockets {version('websockets')}"
    )


def document(results: Results, args: argparse.Namespace, argv: Sequence[str], load: tuple[float, ...]) -> str:
    """The generated part of BENCHMARKS.md: how it was measured, then the tables."""
    report = Report(results)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["scripts/bench", *argv])
    shape = (
        f"{args.appends} client appends of {args.append_ms:g} ms ({pcm16_bytes(args.append_ms)} bytes PCM16) per turn, "
        f"then a response of {args.audio_deltas} audio deltas of {args.delta_ms:g} ms, "
        f"{args.transcript_deltas} transcript deltas and `response.done`"
    )
    return f"""
Measured {when} with `{command}` in {results.seconds:.0f} s on a **shared** machine (other
work may run beside it; load average {load[0]:.2f} at the start): {machine()}.

Traffic: {shape}. Throughput: {args.sessions} sessions in a closed loop for {args.seconds:g} s per configuration
and round; latency: {args.latency_sessions} sessions streaming their audio in real time for {args.seconds:g} s,
each server frame timed from the client's `response.create`. {args.rounds} rounds in serpentine order. Every
figure is message payload, both directions; clients offer permessage-deflate.

{configurations(args.configs)}

### Relay (medians over rounds, range in brackets; ratios are per round, against mitmdump in the same round)

{report.relay_table()}

### Memory (the proxy's RSS; each phase on a fresh process)

{report.memory_table()}

![RSS over time]({PLOT_NAME})

### Per-frame hook cost (in-process, mitmproxy's test context; median of 5 repeats)

{report.hook_table()}

### Targets (issue #5)

{report.targets_table()}
"""


def configurations(names: Sequence[str]) -> str:
    return "\n".join(f"- **{c.name}**: {c.description}" for c in CONFIGS if c.name in names)


def splice(existing: str | None, generated: str) -> str:
    """Replace what lies between the markers, keeping the hand-written analysis around them."""
    block = f"{BEGIN}\n{generated}\n{END}"
    if existing and BEGIN in existing and END in existing:
        head, rest = existing.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    return f"# Benchmarks\n\n{block}\n"


def plot(results: Results, path: Path) -> None:
    """RSS over time during the long session, and after each short session of the churn."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.ticker import MaxNLocator

    figure, (soaked, churned) = pyplot.subplots(1, 2, figsize=(12, 4.5))
    for name, run in ordered(results.memory):
        soaked.plot(
            [t for t, _ in run.soak], [rss for _, rss in run.soak], label=f"{name} ({run.soak_megabytes:.0f} MB)"
        )
        churned.plot(range(1, len(run.churn) + 1), run.churn, marker=".", label=name)
    soaked.set(title="One long session", xlabel="seconds", ylabel="RSS (MB)")
    churned.set(title="Sessions opened and closed in turn", xlabel="sessions closed", ylabel="RSS (MB)")
    churned.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axes in (soaked, churned):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


# --- command line -------------------------------------------------------------------------------

SMOKE = {
    "rounds": 1,
    "seconds": 0.5,
    "sessions": 2,
    "latency_sessions": 2,
    "appends": 3,
    "audio_deltas": 6,
    "soak_mb": 3.0,
    "churn_sessions": 3,
    "churn_turns": 1,
    "hook_iterations": 2000,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a few seconds' run for CI; writes to a new temp directory")
    p.add_argument("--output", type=Path, help="the Markdown file to write (default: BENCHMARKS.md)")
    p.add_argument(
        "--configs",
        default=",".join(c.name for c in DEFAULT_CONFIGS),
        help=f"comma-separated, of {', '.join(c.name for c in CONFIGS)} (default: %(default)s)",
    )
    p.add_argument("--rounds", type=int, default=8, help="rounds over all configurations (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=3, help="per load, configuration and round (default: %(default)s)")
    p.add_argument("--sessions", type=int, default=8, help="concurrent sessions, throughput (default: %(default)s)")
    p.add_argument("--latency-sessions", type=int, default=8, help="paced sessions, latency (default: %(default)s)")
    p.add_argument("--appends", type=int, default=10, help="client audio appends per turn (default: %(default)s)")
    p.add_argument("--append-ms", type=float, default=100, help="audio per client append (default: %(default)s)")
    p.add_argument(
        "--audio-deltas", type=int, default=24, help="server audio deltas per response (default: %(default)s)"
    )
    p.add_argument("--delta-ms", type=float, default=100, help="audio per server delta (default: %(default)s)")
    p.add_argument("--transcript-deltas", type=int, default=6, help="per response (default: %(default)s)")
    p.add_argument("--soak-mb", type=float, default=250, help="payload of the long session (default: %(default)s)")
    p.add_argument("--churn-sessions", type=int, default=50, help="sessions opened and closed (default: %(default)s)")
    p.add_argument("--churn-turns", type=int, default=2, help="turns per churn session (default: %(default)s)")
    p.add_argument("--hook-iterations", type=int, default=200_000, help="calls per hook timing (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="of the simulator's usage numbers and the audio noise")
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """--smoke shrinks every size the command line does not set, and never writes BENCHMARKS.md."""
    p = parser()
    args = p.parse_args(argv)
    if args.smoke:
        p.set_defaults(**SMOKE)
        args = p.parse_args(argv)
        if args.output is None:
            args.output = Path(tempfile.mkdtemp(prefix="bench-smoke-")) / "BENCHMARKS.md"
    args.output = args.output or BENCHMARKS
    args.configs = [name.strip() for name in args.configs.split(",")]
    unknown = set(args.configs) - {c.name for c in CONFIGS}
    if unknown:
        p.error(f"unknown configurations: {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if LITELLM.name in args.configs:
        try:
            install()  # before the clock starts: the first time, this downloads LiteLLM
        except RuntimeError as e:
            print(f"scripts/bench: {e}", file=sys.stderr)
            return 2
    load = os.getloadavg()
    results = Bench(args).run()
    generated = document(results, args, argv, load)
    output: Path = args.output
    output.write_text(splice(output.read_text(encoding="utf-8") if output.exists() else None, generated))
    plot(results, output.parent / PLOT_NAME)
    print(generated)
    print(f"written: {output} and {output.parent / PLOT_NAME}")
    problems = [problem for found in results.accounting.values() for problem in found]
    for problem in problems:
        print(f"ACCOUNTING MISMATCH: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
