"""The configurations scripts/bench compares, how each one's proxy starts, and where its clients connect."""

from __future__ import annotations

import contextlib
import inspect
import io
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ai_gateway.config.policy import DEFAULT_POLICY, load_policy
from ai_gateway_tools.bench.litellm import LITELLM_VERSION, LitellmProcess
from ai_gateway_tools.bench.portkey import PORTKEY_VERSION, PortkeyProcess
from ai_gateway_tools.bench.probe import EmptyHook
from ai_gateway_tools.harness import GatewayProcess, free_port
from ai_gateway_tools.loadgen import LoadStats, Stop, Traffic, UpstreamProcess, drive


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


class FloorRelay(GatewayProcess):
    """The byte floor (floor.py): forwards bytes both ways, parses nothing."""

    def command(self) -> list[str]:
        upstream = self.upstream.removeprefix("http://").rstrip("/")
        return [sys.executable, "-m", "ai_gateway_tools.bench.floor", str(self.port), upstream]

    def ready(self) -> bool:
        return " listening at " in self.log()


class BaselineGateway(GatewayProcess):
    """`mitmdump -s addons/gateway.py` of an earlier commit's tree, with its own package and default policy."""

    def __init__(self, upstream: str, tree: Path) -> None:
        super().__init__(upstream, env={"PYTHONPATH": str(tree / "addons")})
        self.script = tree / "addons" / "gateway.py"

    def command(self) -> list[str]:
        command = super().command()
        command[command.index("-s") + 1] = str(self.script)
        return command


class ServedGateway(GatewayProcess):
    """scripts/serve beside a simulator in a process of its own (`python -m MODULE`, which prints its
    URL first), started before the gateway and stopped after it; `serve` sets the gateway's options
    that point at it (None: no simulator)."""

    def __init__(
        self, upstream: str, module: str | None, options: dict[str, str] | None = None, service_args: Sequence[str] = ()
    ) -> None:
        super().__init__(upstream, options=options, launcher="serve")
        self.module = module
        self.service_args = service_args  # the simulator's command line
        self.service: subprocess.Popen[str] | None = None

    def serve(self, url: str | None) -> None:
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        url = None
        if self.module is not None:
            command = [sys.executable, "-m", self.module, *self.service_args]
            self.service = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=self.env)
            assert self.service.stdout is not None
            url = self.service.stdout.readline().split()[-1]
        try:
            self.serve(url)
            return super().start(timeout)
        except BaseException:  # a policy the gateway refuses, a gateway that never listens: no service left behind
            self.stop_service()
            raise

    def stop_service(self, timeout: float = 15.0) -> None:
        if self.service is not None:
            self.service.terminate()
            self.service.wait(timeout)

    def stop(self, timeout: float = 15.0) -> int | None:
        try:
            return super().stop(timeout)
        finally:
            self.stop_service(timeout)


class ObservedGateway(ServedGateway):
    """scripts/serve with the JSON access log and traces sent to an OTLP receiver in a process of its own."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream, "ai_gateway_tools.simulators.otlp", {"gateway_access_log": "json"})

    def serve(self, url: str | None) -> None:
        assert url is not None
        self.options["gateway_otlp_endpoint"] = url


class GuardedGateway(ServedGateway):
    """scripts/serve with a regex guard and a moderation guard, both phases, the moderation guard
    asking the guard simulator in a process of its own (issue #24: capacity with guards on). The
    service `answering` at once, `slow` (answering after 1 s, past the guard's 500 ms timeout),
    `dead` (a port nobody listens on), or None: the regex guard alone (what the guards cost
    without a call per window)."""

    def __init__(
        self, upstream: str, directory: Path, service: Literal["answering", "slow", "dead"] | None = "answering"
    ) -> None:
        simulated = service in ("answering", "slow")
        args = ("--delay", "1.0") if service == "slow" else ()
        super().__init__(upstream, "ai_gateway_tools.simulators.guard" if simulated else None, service_args=args)
        self.directory = directory  # a copy of the default policy's directory: its price list beside it
        self.dead = service == "dead"

    def serve(self, url: str | None) -> None:
        url = f"http://127.0.0.1:{free_port()}" if self.dead else url
        self.options["gateway_policy"] = str(guarded_policy(self.directory, url))


def guarded_policy(directory: Path, guard_url: str | None) -> Path:
    """The default policy with a deny pattern and (given its URL) a moderation endpoint on both
    phases, in `directory`."""
    document = yaml.safe_load(DEFAULT_POLICY.read_text(encoding="utf-8"))
    document["guardrails"] = [
        {"name": "no-project-names", "kind": "regex", "deny": [r"project\s+falcon"], "phases": ["input", "output"]},
    ]
    if guard_url is not None:
        document["guardrails"].append(
            {
                "name": "moderation",
                "kind": "moderation",
                "url": f"{guard_url}/v1/moderations",
                "phases": ["input", "output"],
                "timeout_ms": 500,
                "on_error": "open",
            }
        )
    path = directory / f"guarded-{'service' if guard_url else 'regex'}-{DEFAULT_POLICY.name}"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    load_policy(path)
    return path


@dataclass(frozen=True)
class Workdir:
    """Files some configurations start their proxy with, written to the run's temp directory."""

    policy: Path  # the default policy, keeping compression
    empty_addon: Path  # a script whose websocket_message does nothing
    directory: Path  # where a proxy writes its own files (LiteLLM: its config and usage log)
    baseline: Path | None = None  # the tree of the commit given to --baseline: its addons/ and policies/

    @classmethod
    def create(cls, directory: Path, baseline: str | None = None) -> Workdir:
        empty_addon = directory / "empty_addon.py"
        source = inspect.getsource(EmptyHook)  # the same floor as the microbenchmark's
        empty_addon.write_text(f"from __future__ import annotations\n\n\n{source}\n\naddons = [EmptyHook()]\n")
        tree = None if baseline is None else extract(baseline, directory / "baseline")
        return cls(keep_compression_policy(directory), empty_addon, directory, tree)


ROOT = Path(__file__).resolve().parents[3]  # the checkout: its git repository has the baseline's commit


def resolve_commit(rev: str) -> str:
    """The full hash of a commit of this checkout's repository; raises ValueError for anything else."""
    command = ["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"]
    found = subprocess.run(command, capture_output=True, text=True, check=False)
    if found.returncode != 0:
        raise ValueError(f"--baseline: {rev!r} is not a commit of {ROOT}")
    return found.stdout.strip()


def extract(commit: str, into: Path) -> Path:
    """The commit's addons/ and policies/ (what `mitmdump -s addons/gateway.py` runs), read with
    `git archive`: the repository and its worktrees are left as they are."""
    command = ["git", "-C", str(ROOT), "archive", "--format=tar", commit, "addons", "policies"]
    archive = subprocess.run(command, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


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
    "`mitmdump -s addons/gateway.py`, default policy and relay (`gateway_relay=auto`: sessions relayed between "
    "their sockets by the event loop, frames read on the side, no compression)",
    lambda upstream, work: GatewayProcess(upstream),
    metered=True,
)
# Compression is negotiated only on the messages path (the frames path strips the offer).
GATEWAY_DEFLATE = Config(
    "gateway-deflate",
    "the gateway with the default policy minus the removal of `sec-websocket-extensions`, on "
    "`gateway_relay=messages`: permessage-deflate on both legs, as mitmdump",
    lambda upstream, work: GatewayProcess(
        upstream, options={"gateway_policy": str(work.policy), "gateway_relay": "messages"}
    ),
    metered=True,
)
SERVE = Config(
    "serve",
    "`scripts/serve` (the lean launcher: only the addons a reverse gateway needs, uvloop), default policy and "
    "relay (sockets)",
    lambda upstream, work: GatewayProcess(upstream, launcher="serve"),
    metered=True,
)

# gateway_relay=messages: the path before issue #22 (mitmproxy's WebSocket layer, every message a
# hook), beside the default; and the floor the byte paths are measured against.
MESSAGES = {"gateway_relay": "messages"}
GATEWAY_MESSAGES = Config(
    "gateway-messages",
    "`mitmdump -s addons/gateway.py --set gateway_relay=messages`: sessions relayed by mitmproxy's WebSocket layer",
    lambda upstream, work: GatewayProcess(upstream, options=MESSAGES),
    metered=True,
)
SERVE_MESSAGES = Config(
    "serve-messages",
    "`scripts/serve --set gateway_relay=messages`",
    lambda upstream, work: GatewayProcess(upstream, launcher="serve", options=MESSAGES),
    metered=True,
)
# gateway_relay=frames (issue #22, the first design): sessions relayed as bytes by mitmproxy's TCP
# layer, frames read from its chunks on the side.
FRAMES = {"gateway_relay": "frames"}
GATEWAY_FRAMES = Config(
    "gateway-frames",
    "`mitmdump -s addons/gateway.py --set gateway_relay=frames`: sessions relayed as bytes by mitmproxy's TCP "
    "layer, the gateway reading frames from its chunks",
    lambda upstream, work: GatewayProcess(upstream, options=FRAMES),
    metered=True,
)
SERVE_FRAMES = Config(
    "serve-frames",
    "`scripts/serve --set gateway_relay=frames`",
    lambda upstream, work: GatewayProcess(upstream, launcher="serve", options=FRAMES),
    metered=True,
)
FLOOR = Config(
    "floor",
    "a plain uvloop relay forwarding bytes both ways, parsing nothing (bench/floor.py): the Python floor",
    lambda upstream, work: FloorRelay(upstream),
)


def _baseline(work: Workdir) -> Path:
    if work.baseline is None:
        raise ValueError("the baseline configuration needs --baseline REV")
    return work.baseline


# Only with --baseline REV, which adds it (issue #13): the gateway as it was, side by side.
BASELINE = Config(
    "baseline",
    "`mitmdump -s addons/gateway.py` of the commit given to `--baseline`, its own default policy; its "
    "/metrics are another version's, so only the relay is checked against the ledger",
    lambda upstream, work: BaselineGateway(upstream, _baseline(work)),
)
# Not run by default: what the access log and traces cost (issue #16), both off against both on.
SERVE_QUIET = Config(
    "serve-quiet",
    "`scripts/serve` with `gateway_access_log=off` and no traces: nothing reported but metrics",
    lambda upstream, work: GatewayProcess(upstream, launcher="serve", options={"gateway_access_log": "off"}),
    metered=True,
)
SERVE_OBSERVED = Config(
    "serve-observed",
    "`scripts/serve` with the JSON access log and OpenTelemetry traces to a loopback OTLP/HTTP receiver",
    lambda upstream, work: ObservedGateway(upstream),
    metered=True,
)
# Not run by default (issue #24): what guardrails cost, against `serve` (target: 0.95 of its capacity).
SERVE_GUARDED = Config(
    "serve-guarded",
    "`scripts/serve` with a regex guard and a moderation guard on both phases, the moderation guard asking "
    "the guard simulator (its own process) about every window of each response's transcript",
    lambda upstream, work: GuardedGateway(upstream, work.policy.parent),
    metered=True,
)
# Not run by default: the regex guard alone, to tell the guards' own cost from the service call's.
SERVE_GUARDED_REGEX = Config(
    "serve-guarded-regex",
    "`scripts/serve` with the regex guard alone on both phases (no guard service asked)",
    lambda upstream, work: GuardedGateway(upstream, work.policy.parent, service=None),
    metered=True,
)
# Not run by default: the moderation service slow past its timeout, or dead (issue #24: "a slow or
# dead guard service costs the relay nothing measurable").
SERVE_GUARDED_SLOW = Config(
    "serve-guarded-slow",
    "`serve-guarded` with a moderation service that answers after 1 s, past the guard's 500 ms timeout",
    lambda upstream, work: GuardedGateway(upstream, work.policy.parent, service="slow"),
    metered=True,
)
SERVE_GUARDED_DEAD = Config(
    "serve-guarded-dead",
    "`serve-guarded` with the moderation guard's URL a port nobody listens on",
    lambda upstream, work: GuardedGateway(upstream, work.policy.parent, service="dead"),
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
# Only in the capacity benchmark (capacity.py), which has its own set.
SERVE_WORKERS2 = Config(
    "serve-workers2",
    "`scripts/serve --workers 2`, default policy: two workers behind one port, pinned to the same one CPU here",
    lambda upstream, work: GatewayProcess(upstream, launcher="serve", args=["--workers", "2"]),
    metered=True,
)
# Only in the capacity benchmark, not by default: what freezing startup's objects out of the
# garbage collector gives (gateway_gc_freeze, on by default), the gateway without it.
GATEWAY_NOFREEZE = Config(
    "gateway-nofreeze",
    "`mitmdump -s addons/gateway.py` with `gateway_gc_freeze=false`: every full collection scans startup's objects",
    lambda upstream, work: GatewayProcess(upstream, options={"gateway_gc_freeze": "false"}),
    metered=True,
)
PORTKEY = Config(
    "portkey",
    f"Portkey's gateway {PORTKEY_VERSION} (npm `@portkey-ai/gateway`, Node.js, in `.bench/portkey`): its "
    "`/v1/realtime` relay, which dials api.openai.com, sent to the simulator by a `NODE_OPTIONS=--require` "
    "preload (portkey.py); it parses every server event and meters nothing",
    lambda upstream, work: PortkeyProcess(upstream, work.directory),
)
CONFIGS = (
    DIRECT, MITMDUMP, EMPTY_ADDON, BASELINE, GATEWAY, GATEWAY_DEFLATE, SERVE, SERVE_QUIET, SERVE_OBSERVED, LITELLM,
    GATEWAY_MESSAGES, SERVE_MESSAGES, GATEWAY_FRAMES, SERVE_FRAMES, FLOOR, SERVE_GUARDED, SERVE_GUARDED_REGEX,
)  # fmt: skip
DEFAULT_CONFIGS = (DIRECT, MITMDUMP, GATEWAY, GATEWAY_DEFLATE, SERVE)
# Measured in this order (and back): mitmdump sits next to each gateway, and the baseline next to
# the gateway, so the pairs that make the ratios are measured one right after the other.
RUN_ORDER = (
    DIRECT, FLOOR, BASELINE, GATEWAY, GATEWAY_MESSAGES, GATEWAY_FRAMES, MITMDUMP, GATEWAY_DEFLATE, SERVE,
    SERVE_GUARDED, SERVE_GUARDED_REGEX, SERVE_MESSAGES, SERVE_FRAMES, SERVE_QUIET, SERVE_OBSERVED, LITELLM, EMPTY_ADDON,
)  # fmt: skip


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


@contextlib.contextmanager
def endpoint(config: Config, upstream: UpstreamProcess, work: Workdir) -> Iterator[GatewayProcess | None]:
    """The configuration's proxy in front of the upstream, running for the block (None: direct)."""
    if config.proxy is None:
        yield None
        return
    with config.proxy(upstream.url, work) as proxy:
        yield proxy


@dataclass(frozen=True)
class Address:
    """Where the clients connect (a proxy, or the simulator), with the headers that proxy wants."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)

    def drive(self, model: str, traffic: Traffic, stop: Stop, **options: Any) -> Awaitable[LoadStats]:
        return drive(self.url, model, traffic, stop, headers=self.headers, **options)


def address(proxy: GatewayProcess | None, upstream: UpstreamProcess) -> Address:
    """The proxy's address, or the simulator's when there is none; the peers also want their headers."""
    if proxy is None:
        return Address(upstream.url)
    return Address(proxy.url, proxy.headers if isinstance(proxy, LitellmProcess | PortkeyProcess) else {})


def model(config: Config, phase: str) -> str:
    """A request model per configuration and phase, so that each reads only its own ledger and metrics."""
    return f"bench-{phase}-{config.name}"
