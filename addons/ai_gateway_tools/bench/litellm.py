"""LiteLLM's proxy as the bench's peer (issue #8): its Realtime relay in front of the same simulator.

LiteLLM is not a dependency of the project. The first time the bench's `litellm` configuration
runs, one pinned version is installed into a virtual environment of its own (`.bench/litellm-venv`,
made with the bench's own Python), so that its few hundred packages never meet the gateway's.

LiteLLM meters a Realtime session once, when it closes: the proxy hands the session's stored
events to its success callbacks, which is where its spend logs, Prometheus metrics and budgets get
their numbers. Its spend logs need a database, so the bench registers a small callback of its own
(written next to the proxy's config) that appends each session's logged usage to a JSON lines
file, and compares those totals with the simulator's ledger. LiteLLM's figures are reported, not
asserted: the bench measures what a peer does, and only fails on the gateway's own accounting.
"""

from __future__ import annotations

import json
import platform
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import yaml

from ai_gateway_tools.harness import GatewayProcess
from ai_gateway_tools.simulators.realtime import SentUsage

ROOT = Path(__file__).resolve().parents[3]
LITELLM_VERSION = "1.108.7"  # the newest whose `proxy` extra installs: later ones pin packages PyPI lacks
REQUIREMENT = f"litellm[proxy]=={LITELLM_VERSION}"
VENV = ROOT / ".bench" / "litellm-venv"
USAGE_LOG_ENV = "BENCH_LITELLM_USAGE_LOG"
START_TIMEOUT = 120.0  # seconds; LiteLLM imports for 5 to 10 s on an idle machine, much longer on a loaded one
LOG_TIMEOUT = 10.0  # seconds for LiteLLM's logging worker to log the sessions that just closed

# The success callback the proxy loads (`litellm_settings.callbacks`). It runs inside LiteLLM, so it
# cannot import this package; it only copies out what LiteLLM logged, and Tally reads it.
CALLBACK_MODULE = "bench_usage"
CALLBACK_SOURCE = f'''"""Written by ai_gateway_tools.bench.litellm: LiteLLM's usage of each session in JSON lines."""

import json
import os

from litellm.integrations.custom_logger import CustomLogger


class UsageLog(CustomLogger):
    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        logged = kwargs.get("standard_logging_object") or {{}}
        usage = (logged.get("metadata") or {{}}).get("usage_object") or {{}}
        events = response_obj if isinstance(response_obj, list) else []
        record = {{
            "model": logged.get("model_group"),
            "responses": sum(event.get("type") == "response.done" for event in events),
            "input_tokens": logged.get("prompt_tokens") or 0,
            "output_tokens": logged.get("completion_tokens") or 0,
            "cached_tokens": (usage.get("prompt_tokens_details") or {{}}).get("cached_tokens") or 0,
        }}
        with open(os.environ["{USAGE_LOG_ENV}"], "a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\\n")


usage_log = UsageLog()
'''


# --- installing it ------------------------------------------------------------------------------


def install(venv: Path = VENV) -> Path:
    """The `litellm` command of the pinned version, installed on first use.

    A marker written after a successful install names the version and the Python it was made
    with: an interrupted install, another pin or a new Python makes a fresh environment.
    """
    marker = venv / "bench-installed.txt"
    wanted = f"{REQUIREMENT} on Python {platform.python_version()}\n"
    executable = venv / "bin" / "litellm"
    if marker.is_file() and marker.read_text(encoding="utf-8") == wanted and executable.is_file():
        return executable
    print(f"scripts/bench: installing {REQUIREMENT} into {venv} (first use; about 730 MB from PyPI)", file=sys.stderr)
    _run([sys.executable, "-m", "venv", "--clear", str(venv)])
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", REQUIREMENT])
    marker.write_text(wanted, encoding="utf-8")
    return executable


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = "\n".join((result.stdout + result.stderr).strip().splitlines()[-20:])
        raise RuntimeError(
            f"could not install {REQUIREMENT}: `{' '.join(command)}` exited {result.returncode}:\n{output}"
        )


# --- its usage, against the ledger -------------------------------------------------------------


@dataclass(frozen=True)
class Tally:
    """Usage totals of sessions: what the upstream sent (its ledger), or what LiteLLM logged."""

    sessions: int = 0  # sessions with at least one response
    responses: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0

    def __add__(self, other: Tally) -> Tally:
        return Tally(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    @classmethod
    def of_ledger(cls, ledger: Iterable[SentUsage]) -> Tally:
        responses = [entry for entry in ledger if entry.kind == "response"]
        return cls(
            sessions=len({entry.session_id for entry in responses}),
            responses=len(responses),
            input_tokens=sum(entry.usage["input_tokens"] for entry in responses),
            output_tokens=sum(entry.usage["output_tokens"] for entry in responses),
            cached_tokens=sum(entry.usage["input_token_details"].get("cached_tokens", 0) for entry in responses),
        )

    @classmethod
    def of_log(cls, records: Iterable[Mapping[str, Any]]) -> Tally:
        """Sessions LiteLLM logged (one record each) that had responses."""
        billed = [r for r in records if r["responses"]]
        return cls(
            sessions=len(billed),
            responses=sum(r["responses"] for r in billed),
            input_tokens=sum(r["input_tokens"] for r in billed),
            output_tokens=sum(r["output_tokens"] for r in billed),
            cached_tokens=sum(r["cached_tokens"] for r in billed),
        )


@dataclass(frozen=True)
class Metered:
    """What LiteLLM counted against what the upstream sent, over the same sessions."""

    counted: Tally = Tally()
    sent: Tally = Tally()

    def __add__(self, other: Metered) -> Metered:
        return Metered(self.counted + other.counted, self.sent + other.sent)

    def summary(self) -> str:
        """For the bench's accounting column: counts that differ are shown as counted/sent."""
        counted, sent = self.counted, self.sent
        head = (
            f"its own log, at session close: {counted.responses:,}/{sent.responses:,} responses "
            f"in {counted.sessions:,}/{sent.sessions:,} sessions"
        )
        tokens = {"input": "input_tokens", "output": "output_tokens", "cached": "cached_tokens"}
        wrong = [
            f"{name} tokens {getattr(counted, field):,}/{getattr(sent, field):,}"
            for name, field in tokens.items()
            if getattr(counted, field) != getattr(sent, field)
        ]
        return f"{head}, {', '.join(wrong) if wrong else 'input, output and cached tokens exact'}"


# --- the proxy ----------------------------------------------------------------------------------


class LitellmProcess(GatewayProcess):
    """`litellm --config … --num_workers 1` in front of `upstream`, with the interface of the bench's other
    proxies (`url`, `process`, a context manager), the key its clients must send, and its logged usage."""

    def __init__(self, upstream: str, parent: Path) -> None:
        self.key = f"sk-{secrets.token_hex(32)}"  # LiteLLM refuses to start without a strong master key
        directory = Path(tempfile.mkdtemp(prefix="litellm-", dir=parent))
        self.usage_log = directory / "usage.jsonl"
        self.config = write_config(directory, upstream, self.key)
        env = {USAGE_LOG_ENV: str(self.usage_log), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}  # no fetch at startup
        super().__init__(upstream, env=env)
        self.tool = str(install())

    def command(self) -> list[str]:
        return [
            self.tool, "--config", str(self.config),
            "--host", "127.0.0.1", "--port", str(self.port), "--num_workers", "1",
        ]  # fmt: skip

    def start(self, timeout: float = START_TIMEOUT) -> LitellmProcess:
        super().start(timeout)
        return self

    def ready(self) -> bool:
        """LiteLLM's liveness route answers once the app has started (and opens no upstream connection)."""
        try:
            with urllib.request.urlopen(f"{self.url}/health/liveliness", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    @property
    def headers(self) -> dict[str, str]:
        """LiteLLM refuses a WebSocket handshake without a key."""
        return {"Authorization": f"Bearer {self.key}"}

    def metered(self, model: str, ledger: Iterable[SentUsage]) -> Metered:
        """LiteLLM's logged usage for `model` against the ledger. Sessions are logged by a background worker
        after they close, so the log is read again until it has every response, or LOG_TIMEOUT passes."""
        sent = Tally.of_ledger(ledger)
        deadline = time.monotonic() + LOG_TIMEOUT
        while True:
            counted = Tally.of_log(r for r in read_log(self.usage_log) if r["model"] == model)
            if counted.responses >= sent.responses or time.monotonic() > deadline:
                return Metered(counted, sent)
            time.sleep(0.1)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records the callback wrote so far; a line still being written is left out."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.endswith("}")]


def write_config(directory: Path, upstream: str, key: str) -> Path:
    """Every model the bench asks for goes to the simulator as an OpenAI model of the same name.

    LiteLLM builds the upstream URL from `api_base` (scheme turned into ws, path set to
    /v1/realtime, `model` set to the name after `openai/`), so the simulator's ledger is keyed by
    the bench's model names, as through the other proxies.
    """
    (directory / f"{CALLBACK_MODULE}.py").write_text(CALLBACK_SOURCE, encoding="utf-8")
    config = {
        "model_list": [
            {
                "model_name": "*",
                "litellm_params": {"model": "openai/*", "api_base": upstream, "api_key": "sk-simulated-upstream"},
            }
        ],
        "litellm_settings": {"callbacks": f"{CALLBACK_MODULE}.usage_log"},
        "general_settings": {"master_key": key},
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path
