"""Running the real gateway as a child process and reading its metrics: for the demo, tests and benchmarks.

The tests and the demo exercise exactly what users run, `mitmdump -s addons/gateway.py`, on
real sockets; this module starts it, waits for it to be ready (a poll with a deadline, never a
fixed sleep) and reads /metrics back with prometheus_client's own parser.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

GATEWAY_SCRIPT = Path(__file__).resolve().parents[1] / "gateway.py"
SampleKey = tuple[str, frozenset[tuple[str, str]]]


@functools.cache  # read once: every server a test starts asks for a port
def _ephemeral_low(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A loopback port nothing listens on, below the kernel's ephemeral range.

    A port the kernel picks (`bind(0)`) comes from the range it also takes outgoing connections'
    source ports from, so between this probe and the server's own bind another test's client
    could take it (`address already in use`, seen under parallel tests); a random port below that
    range is only ever taken by a server that asked for it.
    """
    low = _ephemeral_low()
    while True:
        port = random.randrange(10000, low) if low > 11000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]


def popen(command: Sequence[str], env: Mapping[str, str], log: IO[bytes]) -> Any:
    """Run the command, its output in `log`."""
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


class GatewayProcess:
    """`mitmdump` (or `mitmweb`) with the gateway script, in reverse mode in front of `upstream`;
    with `launcher="serve"`, the production launcher (`python -m ai_gateway.launcher.serve`) instead."""

    # How the command is started (a `subprocess.Popen` or what quacks like one): the tests fork
    # the gateways they can from a server that has imported them (tests/forkserver.py).
    spawn: Callable[[Sequence[str], Mapping[str, str], IO[bytes]], Any] = staticmethod(popen)

    def __init__(
        self,
        upstream: str,
        *,
        options: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        tool: str = "mitmdump",
        args: Iterable[str] = (),
        launcher: str = "mitmdump",
    ) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.upstream = upstream
        self.options = {"gateway_metrics_port": str(self.metrics_port), **(options or {})}
        self.env = {**os.environ, **(env or {})}
        self.tool = str(Path(sys.executable).parent / tool)
        self.args = list(args)
        self.launcher = launcher
        self.process: Any = None  # a subprocess.Popen, or what `spawn` started
        # Outlives the process so a test can read the log after stopping it; closed when collected.
        self._log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        sets = [arg for name, value in self.options.items() for arg in ("--set", f"{name}={value}")]
        program = (
            [sys.executable, "-m", "ai_gateway.launcher.serve"]
            if self.launcher == "serve"
            else [self.tool, "-s", str(GATEWAY_SCRIPT)]
        )
        return [
            *program, "--mode", f"reverse:{self.upstream}",
            "--listen-host", "127.0.0.1", "-p", str(self.port), *sets, *self.args,
        ]  # fmt: skip

    @property
    def name(self) -> str:
        return "serve" if self.launcher == "serve" else Path(self.tool).name

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        self.process = self.spawn(self.command(), self.env, self._log)
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.05)
        return self

    def run_until_exit(self, timeout: float = 30.0) -> tuple[int, str]:
        """The command run to its end, for a start that must fail: its exit code and its output."""
        self.process = self.spawn(self.command(), self.env, self._log)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        return code, self.log()

    def ready(self) -> bool:
        """The metrics server starts once the proxy listens; without it, mitmproxy's own log line tells.

        Probing the proxy port itself would make mitmproxy open (and drop) an upstream connection.
        """
        if self.options["gateway_metrics_port"] == "0":
            return " listening at " in self.log()
        try:
            socket.create_connection(("127.0.0.1", self.metrics_port), timeout=1).close()
        except OSError:
            return False
        return True

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (mitmproxy runs its `done` hooks), then SIGKILL if it hangs."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def scrape(metrics_url: str) -> dict[SampleKey, float]:
    """Every sample on a /metrics page, keyed by name and labels; `_created` samples left out."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def scrape_until(
    metrics_url: str, done: Callable[[dict[SampleKey, float]], bool], timeout: float = 10.0
) -> dict[SampleKey, float]:
    """Scrape until `done` holds or the deadline passes; the last scrape either way.

    A client can read the end of a streamed HTTP body a moment before mitmproxy runs the `response`
    hook that meters it, so a test polls rather than scraping once.
    """
    deadline = time.monotonic() + timeout
    samples = scrape(metrics_url)
    while not done(samples) and time.monotonic() < deadline:
        time.sleep(0.02)
        samples = scrape(metrics_url)
    return samples


def assert_metered_exactly(metrics_url: str, model: str, sent: Sequence[Any], *, system: str = "openai") -> None:
    """/metrics shows exactly the usage the upstream sent for a request model (a simulator's ledger
    entries; none: nothing metered) under that model: polled with a deadline, as `scrape_until` says why."""
    expected = expected_samples(sent, system=system)

    def metered(samples: Mapping[SampleKey, float]) -> dict[SampleKey, float]:
        return usage_only(select(samples, gen_ai_request_model=model))

    assert metered(scrape_until(metrics_url, lambda samples: metered(samples) == expected)) == expected


def parse_errors(metrics_url: str, reason: str | None = None) -> float:
    """parse_errors_total, summed over route types (and reasons, unless one is named)."""
    return sum(
        value
        for (name, labels), value in scrape(metrics_url).items()
        if name.endswith("_gateway_parse_errors_total") and (reason is None or ("reason", reason) in labels)
    )


def select(samples: Mapping[SampleKey, float], **labels: str) -> dict[SampleKey, float]:
    """The samples whose labels include all of `labels`."""
    wanted = set(labels.items())
    return {key: value for key, value in samples.items() if wanted <= key[1]}


_NOT_USAGE = ("_gen_ai_server_", "_cost_usd", "_price_lookups")


def usage_only(samples: Mapping[SampleKey, float]) -> dict[SampleKey, float]:
    """The usage samples (what expected_samples predicts), without latency and cost."""
    return {key: value for key, value in samples.items() if not any(part in key[0] for part in _NOT_USAGE)}


# The OpenTelemetry token buckets, written out so the oracle does not share the gateway's constant.
_TOKEN_BUCKETS = (
    1,
    4,
    16,
    64,
    256,
    1024,
    4096,
    16384,
    65536,
    262144,
    1048576,
    4194304,
    16777216,
    67108864,
    float("inf"),
)
_BUCKET_LABELS = tuple((bound, floatToGoString(bound)) for bound in _TOKEN_BUCKETS)  # each `le` written once


@dataclass(frozen=True)
class _Shape:
    """Where each kind of ledger entry keeps its counts, written out independently of the gateway."""

    operation: str
    input: str
    output: str | None
    input_details: str
    output_details: str | None
    counts_responses: bool = True
    output_modality: str = "text"  # what output is where its details do not say


_IMAGES = _Shape(
    "image_generation", "input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details", True, "image"
)
_SHAPES = {
    "response": _Shape("realtime", "input_tokens", "output_tokens", "input_token_details", "output_token_details"),
    "unbilled_response": _Shape("realtime", "", None, "", None),
    "transcription": _Shape(
        "transcription", "input_tokens", "output_tokens", "input_token_details", "output_token_details", False
    ),
    "chat": _Shape("chat", "prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details"),
    "responses": _Shape("chat", "input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details"),
    "embeddings": _Shape("embeddings", "prompt_tokens", None, "prompt_tokens_details", None),
    "text_completion": _Shape(
        "text_completion", "prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details"
    ),
    "http_transcription": _Shape("transcription", "input_tokens", "output_tokens", "input_token_details", None),
    "translation": _Shape("translation", "input_tokens", "output_tokens", "input_token_details", None),
    "speech": _Shape(
        "speech", "input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details", True, "audio"
    ),
    "image_generation": _IMAGES,
    "image_edit": _IMAGES,
    # Speech as audio bytes: the characters of its input, counted by the gateway, and the response;
    # streamed (speech_characters) the response is counted with its token usage instead.
    "speech_audio": _Shape("speech", "", None, "", None),
    "speech_characters": _Shape("speech", "", None, "", None, False),
    # OpenAI-compatible realtime servers: Qwen/DashScope spells the details as the Responses API
    # does; vLLM's transcription.done carries Chat Completions' usage.
    "qwen_response": _Shape(
        "realtime", "input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details"
    ),
    "vllm_transcription": _Shape(
        "transcription",
        "prompt_tokens",
        "completion_tokens",
        "prompt_tokens_details",
        "completion_tokens_details",
        False,
    ),
}


def expected_samples(
    sent: Iterable[Any], *, system: str = "openai", prefix: str = "agentgateway"
) -> dict[SampleKey, float]:
    """What /metrics must show for usage the simulators sent (their ledger entries), computed independently.

    Passthrough entries are left out: the gateway must never meter them.
    """
    out: dict[SampleKey, float] = {}

    def add(name: str, labels: Mapping[str, str], value: float) -> None:
        key = (f"{prefix}_{name}", frozenset(labels.items()))
        out[key] = out.get(key, 0) + value

    for entry in sent:
        if entry.kind == "gemini_turn":
            _expect_gemini_turn(add, entry, system)
            continue
        if entry.kind == "live_session":
            _expect_live_session(add, entry, system)
            continue
        shape = _SHAPES.get(entry.kind)
        if shape is None:
            continue
        usage = entry.usage
        labels = {
            "gen_ai_operation_name": shape.operation,
            "gen_ai_system": system,
            "gen_ai_request_model": entry.request_model,
            "gen_ai_response_model": entry.response_model,
        }
        if shape.counts_responses:
            add("gen_ai_client_responses_total", {**labels, "status": entry.status}, 1)
        if entry.kind == "unbilled_response":
            continue
        if "characters" in usage:
            add("gen_ai_client_speech_input_characters_total", labels, usage["characters"])
            continue
        if usage.get("type") == "duration":
            add("gen_ai_client_transcription_audio_seconds_total", labels, usage["seconds"])
            continue
        input_details = usage.get(shape.input_details) or {}
        output_details = (usage.get(shape.output_details) or {}) if shape.output_details else {}
        observations = {"input": usage[shape.input]}
        if shape.output:
            observations["output"] = usage[shape.output]
        if "cached_tokens" in input_details:
            observations["input_cache_read"] = input_details["cached_tokens"]
        _expect_observations(add, labels, observations)
        families = (
            ("input_tokens", usage[shape.input], input_details),
            ("cache_read_input_tokens", input_details.get("cached_tokens"), input_details.get("cached_tokens_details")),
            ("output_tokens", usage[shape.output] if shape.output else None, output_details),
        )
        for family, total, details in families:
            if total is not None:
                rest = shape.output_modality if family == "output_tokens" else "text"
                named = [m for m in ("text", "audio", "image") if m != rest and f"{m}_tokens" in (details or {})]
                _expect_modalities(add, labels, family, total, {m: details[f"{m}_tokens"] for m in named}, rest)
        if "reasoning_tokens" in output_details:
            add(
                "gen_ai_client_inference_usage_reasoning_output_tokens_total",
                labels,
                output_details["reasoning_tokens"],
            )
    return out


def _expect_modalities(
    add: Callable[..., None],
    labels: Mapping[str, str],
    family: str,
    total: int,
    parts: Mapping[str, int],
    rest: str = "text",
) -> None:
    """A total by modality: the reported parts, `rest` as what they leave, and text always (0 if nothing)."""
    counts = {"text": 0, **parts, rest: total - sum(parts.values())}
    for modality, count in counts.items():
        add(f"gen_ai_client_inference_usage_{family}_total", {**labels, "gen_ai_token_modality": modality}, count)


def _expect_observations(add: Callable[..., None], labels: Mapping[str, str], observations: Mapping[str, int]) -> None:
    """The token usage histogram's samples for one response's counts by token type."""
    for token_type, count in observations.items():
        typed = {**labels, "gen_ai_token_type": token_type}
        add("gen_ai_client_token_usage_sum", typed, count)
        add("gen_ai_client_token_usage_count", typed, 1)
        for bound, le in _BUCKET_LABELS:
            add("gen_ai_client_token_usage_bucket", {**typed, "le": le}, count <= bound)


def _expect_live_session(add: Callable[..., None], entry: Any, system: str) -> None:
    """A GPT-Live session's last usage report: its seconds, paused as reported, the rest active."""
    labels = {
        "gen_ai_operation_name": "realtime",
        "gen_ai_system": system,
        "gen_ai_request_model": entry.request_model,
        "gen_ai_response_model": entry.response_model,
    }
    paused = entry.usage.get("paused_seconds", 0)
    add("gen_ai_client_session_seconds_total", {**labels, "kind": "active"}, entry.usage["seconds"] - paused)
    add("gen_ai_client_session_seconds_total", {**labels, "kind": "paused"}, paused)


# Gemini's modalities as the gateway's metrics name them: video is billed as image frames.
_GEMINI_MODALITY = {"TEXT": "text", "AUDIO": "audio", "IMAGE": "image", "VIDEO": "image", "DOCUMENT": "text"}


def _expect_gemini_turn(add: Callable[..., None], entry: Any, system: str) -> None:
    """A Gemini Live turn's usageMetadata: input is prompt plus tool-use prompt, output is response
    (Vertex: candidates) plus thoughts, thoughts and parts without details being text."""
    usage = entry.usage
    labels = {
        "gen_ai_operation_name": "realtime",
        "gen_ai_system": system,
        "gen_ai_request_model": entry.request_model,
        "gen_ai_response_model": entry.response_model,
    }
    add("gen_ai_client_responses_total", {**labels, "status": entry.status}, 1)
    spelling = "response" if "responseTokenCount" in usage else "candidates"
    thoughts = usage.get("thoughtsTokenCount", 0)
    prompt = (usage.get("promptTokenCount", 0), usage.get("promptTokensDetails"))
    tool = (usage.get("toolUsePromptTokenCount", 0), usage.get("toolUsePromptTokensDetails"))
    response = (usage.get(f"{spelling}TokenCount", 0), usage.get(f"{spelling}TokensDetails"))
    cached = (usage.get("cachedContentTokenCount", 0), usage.get("cacheTokensDetails"))
    thinking = (thoughts, [{"modality": "TEXT", "tokenCount": thoughts}] if thoughts else [])
    observations = {"input": prompt[0] + tool[0], "output": response[0] + thoughts}
    if "cachedContentTokenCount" in usage:
        observations["input_cache_read"] = cached[0]
    _expect_observations(add, labels, observations)
    families = [("input_tokens", (prompt, tool)), ("output_tokens", (response, thinking))]
    if "cachedContentTokenCount" in usage:
        families.append(("cache_read_input_tokens", (cached,)))
    for family, parts in families:
        modal: dict[str, int] = {}
        for _, details in parts:
            for detail in details or []:
                modality = _GEMINI_MODALITY.get(detail["modality"], "text")
                if modality != "text":
                    modal[modality] = modal.get(modality, 0) + detail.get("tokenCount", 0)
        _expect_modalities(add, labels, family, sum(count for count, _ in parts), modal)
    if "thoughtsTokenCount" in usage:
        add("gen_ai_client_inference_usage_reasoning_output_tokens_total", labels, thoughts)


class RedisServer:
    """A real `redis-server` on a free loopback port, nothing persisted: the shared limits store
    of the tests and benchmarks. `stop()` and `start()` again keep the port (an outage and its end)."""

    def __init__(self, binary: str = "redis-server") -> None:
        self.binary = binary
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.holder: socket.socket | None = None  # the port held while the server is stopped

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.holder is not None:
            self.holder.close()
            self.holder = None
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.02)
        return self

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Kill the server (an outage); its port stays bound, not listening, until start() or
        close(): connections are refused, and no other test's server (another xdist worker's Redis)
        takes the port and answers in its place."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.holder is None:
            self.holder = socket.socket()
            self.holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # its connections in TIME_WAIT
            self.holder.bind(("127.0.0.1", self.port))

    def close(self) -> None:
        self.stop()
        if self.holder is not None:
            self.holder.close()
            self.holder = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
