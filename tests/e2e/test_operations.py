"""What an operator changes or breaks under a running gateway: a full disk under the ledger, the
ledger or metrics port changed at runtime, a policy path that is not a regular file or is still
being written. Each runs the real gateway on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import websockets

from ai_gateway_tools.debug import mitmweb, web_url
from ai_gateway_tools.harness import GatewayProcess, free_port, scrape
from ai_gateway_tools.simulators.http import HttpSimulator
from ai_gateway_tools.simulators.realtime import SimulatorThread

from ..clients import wait_until, websocket_base, write_padded

LEDGER_ERRORS = "agentgateway_gateway_usage_log_errors_total"


def ledger_errors(gateway: GatewayProcess) -> float:
    return scrape(gateway.metrics_url)[LEDGER_ERRORS, frozenset()]


def ledger_ids(path: Path) -> list[str]:
    """Response ids of the ledger's complete lines (a line cut by a full disk is no JSON object)."""
    ids = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            ids.append(json.loads(line)["response_id"])
    return ids


def log_lines(gateway: GatewayProcess, text: str) -> list[str]:
    return [line for line in gateway.log().splitlines() if text in line]


class Session:
    """A plain websockets Realtime session creating one response at a time."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.finished: list[str] = []

    async def response(self) -> dict:
        """Asks for a response; its response.done, or the error event that refused it."""
        await self.ws.send(json.dumps({"type": "response.create", "event_id": "evt_client_1"}))
        while True:
            event = json.loads(await asyncio.wait_for(self.ws.recv(), 20))
            if event["type"] == "response.done":
                self.finished.append(event["response"]["id"])
                return event
            if event["type"] == "error":
                return event


@contextlib.asynccontextmanager
async def session(gateway: GatewayProcess, model: str = "gpt-realtime-ops"):
    async with websockets.connect(f"{websocket_base(gateway.url)}/v1/realtime?model={model}", max_size=None) as ws:
        yield Session(ws)


def test_ledger_on_dev_full_keeps_relaying_counts_every_lost_line_and_logs_once():
    with (
        SimulatorThread(audio_deltas=1, transcript_deltas=1) as simulator,
        GatewayProcess(simulator.url, options={"gateway_usage_log": "/dev/full"}) as gateway,
    ):

        async def run() -> list[dict]:
            async with session(gateway) as s:
                return [await s.response() for _ in range(20)]

        events = asyncio.run(run())
        assert [e["type"] for e in events] == ["response.done"] * 20
        assert ledger_errors(gateway) == 20
    assert len(log_lines(gateway, "cannot write the usage ledger /dev/full")) == 1
    assert "usage goes unrecorded" in log_lines(gateway, "cannot write the usage ledger")[0]


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a real file system that fills up (needs root, as the test machine has)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(directory: Path) -> Path:
    """Fills the file system `directory` is on; returns the filler file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    with open(filler, "ab", buffering=0) as f, contextlib.suppress(OSError):
        while True:  # the last partial block
            f.write(b"\0")
    return filler


def test_refuse_mode_on_a_full_tmpfs_refuses_new_work_until_the_ledger_recovers(tiny_tmpfs):
    ledger = tiny_tmpfs / "usage.jsonl"
    options = {"gateway_usage_log": str(ledger), "gateway_usage_log_on_error": "refuse"}
    with (
        SimulatorThread(audio_deltas=1, transcript_deltas=1) as simulator,
        GatewayProcess(simulator.url, options=options) as gateway,
    ):

        async def run() -> tuple[Session, list[dict], int]:
            async with session(gateway) as s:
                events = [await s.response() for _ in range(3)]
                filler = fill(tiny_tmpfs)
                # The ledger's last page may still hold a few lines; the first line that does not
                # fit is lost (that response was admitted), and new responses are refused from then on.
                while (event := await s.response())["type"] == "response.done":
                    events.append(event)
                    assert len(events) < 40
                events += [event, await s.response(), await s.response()]
                with pytest.raises(websockets.InvalidStatus) as refused:
                    async with session(gateway):
                        pass
                filler.unlink()
                started = time.monotonic()
                while (event := await s.response())["type"] == "error":
                    events.append(event)
                    assert time.monotonic() - started < 5
                events += [event, await s.response()]
                return s, events, refused.value.response.status_code

        s, events, handshake_status = asyncio.run(run())
        samples = scrape(gateway.metrics_url)
    refusals = [e for e in events if e["type"] == "error"]
    assert len(refusals) >= 3 and [e["type"] for e in events[-2:]] == ["response.done"] * 2
    assert all(
        e["error"]["code"] == "usage_log_unavailable" and e["error"]["event_id"] == "evt_client_1" for e in refusals
    )
    assert handshake_status == 503
    assert samples[LEDGER_ERRORS, frozenset()] == 1
    enforced = "agentgateway_gateway_budget_enforcements_total"
    assert samples[
        enforced,
        frozenset({("scope", "usage_log"), ("action", "refused_response"), ("reason", "usage_log_unavailable")}),
    ] == len(refusals)
    assert (
        samples[
            enforced,
            frozenset({("scope", "usage_log"), ("action", "rejected_session"), ("reason", "usage_log_unavailable")}),
        ]
        == 1
    )
    lost = s.finished[-3]  # the last response before the first refusal; two finished after recovery
    assert ledger_ids(ledger) == [i for i in s.finished if i != lost], "every other finished response is in the ledger"
    assert len(simulator.ledger) == len(s.finished)
    assert len(log_lines(gateway, "cannot write the usage ledger")) == 1
    assert "new requests are refused" in log_lines(gateway, "cannot write the usage ledger")[0]
    assert len(log_lines(gateway, "is written again; 1 lines were lost")) == 1


def test_refuse_mode_answers_http_requests_503_openai_shaped():
    options = {"gateway_usage_log": "/dev/full", "gateway_usage_log_on_error": "refuse"}
    with (
        SimulatorThread(server=HttpSimulator(seed=3)) as simulator,
        GatewayProcess(simulator.url, options=options) as gateway,
    ):
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-client", max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        client.chat.completions.create(model="gpt-4o-mini", messages=messages)  # admitted; its line is lost
        with pytest.raises(openai.InternalServerError) as refused:
            client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        assert ledger_errors(gateway) == 1
    assert refused.value.status_code == 503
    assert refused.value.response.headers["retry-after"] == "1"
    assert refused.value.body["code"] == "usage_log_unavailable"  # type: ignore[index]
    assert len(simulator.requests) == 1


class MitmwebOptions:
    """mitmweb's options API as its UI uses it: PUT /options, logged in with the token, with the
    double-submit XSRF cookie and header its UI sends."""

    def __init__(self, gateway: GatewayProcess) -> None:
        url = web_url(gateway)
        self.base = url.split("/?", 1)[0].rstrip("/")
        self.token = url.split("token=", 1)[1]

    def put(self, **options: object) -> tuple[int, str]:
        xsrf = secrets.token_hex(16)
        request = urllib.request.Request(
            f"{self.base}/options",
            data=json.dumps(options).encode(),
            method="PUT",
            headers={
                "authorization": f"Bearer {self.token}",
                "content-type": "application/json",
                "cookie": f"_mitmproxy_xsrf={xsrf}",
                "x-xsrftoken": xsrf,
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()


def test_changing_the_ledger_at_runtime_moves_open_sessions_and_their_budget_keeps_working(tmp_path):
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    with SimulatorThread(audio_deltas=1, transcript_deltas=1) as simulator:
        # Session spend is counted from the start (a budget no session reaches), then the budget is lowered.
        unlimited = tmp_path / "unlimited.yaml"
        unlimited.write_text("budgets:\n  session: {tokens: 1000000000}\nroutes:\n  /realtime: Realtime\n")
        gateway = mitmweb(simulator.url, web_port=free_port())
        gateway.options.update(gateway_usage_log=str(first), gateway_policy=str(unlimited))
        with gateway:
            api = MitmwebOptions(gateway)

            async def run() -> tuple[Session, dict]:
                async with session(gateway) as s:
                    for _ in range(3):
                        await s.response()
                    assert api.put(gateway_usage_log=str(second)) == (200, "")
                    for _ in range(12):
                        await s.response()
                    # A session budget one token above what the first 3 responses spent: only
                    # what the 12 after the change were charged can exhaust it.
                    spent = sum(e.usage["input_tokens"] + e.usage["output_tokens"] for e in simulator.ledger[:3])
                    budget = tmp_path / "budget.yaml"
                    budget.write_text(f"budgets:\n  session: {{tokens: {spent + 1}}}\nroutes:\n  /realtime: Realtime\n")
                    assert api.put(gateway_policy=str(budget)) == (200, "")
                    return s, await s.response()

            s, refused = asyncio.run(run())
    assert ledger_ids(first) == s.finished[:3]
    assert ledger_ids(second) == s.finished[3:15]
    assert refused["type"] == "error" and refused["error"]["code"] == "budget_exceeded"


def test_a_metrics_port_in_use_is_refused_at_runtime_and_the_old_endpoint_keeps_serving():
    with SimulatorThread() as simulator, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with mitmweb(simulator.url, web_port=free_port()) as gateway:
            api = MitmwebOptions(gateway)
            status, body = api.put(gateway_metrics_port=busy)
            assert status == 400 and f"cannot serve metrics on 127.0.0.1:{busy}: Address already in use" in body
            assert LEDGER_ERRORS in urllib.request.urlopen(gateway.metrics_url, timeout=5).read().decode()
            moved = free_port()
            assert api.put(gateway_metrics_port=moved) == (200, "")
            assert (
                LEDGER_ERRORS in urllib.request.urlopen(f"http://127.0.0.1:{moved}/metrics", timeout=5).read().decode()
            )
            with pytest.raises(OSError):
                urllib.request.urlopen(gateway.metrics_url, timeout=5)
            assert api.put(gateway_metrics_prefix="team") == (200, "")
            page = urllib.request.urlopen(f"http://127.0.0.1:{moved}/metrics", timeout=5).read().decode()
            assert "team_gateway_usage_log_errors_total" in page


@pytest.mark.parametrize("launcher", ["mitmdump", "serve"])
def test_a_named_pipe_as_policy_stops_startup_with_one_line(tmp_path, launcher):
    pipe = tmp_path / "policy.yaml"
    os.mkfifo(pipe)
    gateway = GatewayProcess("http://127.0.0.1:9", options={"gateway_policy": str(pipe)}, launcher=launcher)
    returncode, output = gateway.run_until_exit()
    assert returncode == 1
    assert f"{pipe}: expected a regular policy file, got a named pipe" in output
    assert sum(str(pipe) in line for line in output.splitlines()) == 1
    assert "Traceback" not in output


@pytest.mark.slow
def test_policy_replaced_by_a_pipe_or_a_directory_is_refused_and_traffic_keeps_flowing(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("provider: team-a\nroutes:\n  /realtime: Realtime\n")
    with (
        SimulatorThread(audio_deltas=1) as simulator,
        GatewayProcess(simulator.url, options={"gateway_policy": str(policy)}) as gateway,
    ):

        async def responses(count: int) -> list[str]:
            async with session(gateway) as s:
                return [(await s.response())["type"] for _ in range(count)]

        policy.unlink()
        os.mkfifo(policy)
        wait_until(lambda: log_lines(gateway, "got a named pipe"))
        assert asyncio.run(responses(3)) == ["response.done"] * 3
        policy.unlink()
        policy.mkdir()
        wait_until(lambda: log_lines(gateway, "got a directory"))
        assert asyncio.run(responses(3)) == ["response.done"] * 3
        assert len(log_lines(gateway, "policy change refused")) == 2
        system = {
            dict(labels).get("gen_ai_system")
            for (name, labels) in scrape(gateway.metrics_url)
            if name.startswith("agentgateway_gen_ai_client_responses")
        }
        assert system == {"team-a"}


def test_a_policy_file_still_being_written_is_not_loaded(tmp_path):
    """Written in place in two steps 1.3 s apart (longer than a poll): the first half, valid on
    its own but without the budget, is never applied; the whole file is, once."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("provider: team-a\nroutes:\n  /realtime: Realtime\n")
    with (
        SimulatorThread(audio_deltas=1) as simulator,
        GatewayProcess(simulator.url, options={"gateway_policy": str(policy)}) as gateway,
    ):
        with open(policy, "w") as f:
            f.write("provider: team-b\nroutes:\n  /realtime: Realtime\n")
            f.flush()
            time.sleep(1.3)  # the writer is slow: this pause is what the test is about
            f.write("budgets:\n  session: {tokens: 1}\n")
        wait_until(lambda: log_lines(gateway, "policy reloaded"))

        async def run() -> list[dict]:
            async with session(gateway) as s:
                return [await s.response(), await s.response()]

        first, second = asyncio.run(run())
    assert len(log_lines(gateway, "policy reloaded")) == 1
    assert first["type"] == "response.done" and second["error"]["code"] == "budget_exceeded"


@pytest.mark.slow
def test_a_large_policy_reloads_fast_and_a_too_large_one_is_refused_unread(tmp_path):
    """3 MiB of comments reloads (libyaml); 100 MB is refused by its size, promptly, while the
    3 MiB policy stays in force and responses keep their pace."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("provider: team-a\nroutes:\n  /realtime: Realtime\n")

    def replace(provider: str, size: int) -> float:
        staged = write_padded(tmp_path / "staged.yaml", f"provider: {provider}\nroutes:\n  /realtime: Realtime\n", size)
        os.replace(staged, policy)
        return time.monotonic()

    async def response_seconds(count: int) -> list[float]:
        async with session(gateway) as s:
            seconds = []
            for _ in range(count):
                started = time.monotonic()
                assert (await s.response())["type"] == "response.done"
                seconds.append(time.monotonic() - started)
            return seconds

    with (
        SimulatorThread(audio_deltas=1) as simulator,
        GatewayProcess(simulator.url, options={"gateway_policy": str(policy)}) as gateway,
    ):
        written = replace("team-b", 3 * 2**20)
        wait_until(lambda: log_lines(gateway, "policy reloaded"))
        reloaded = time.monotonic() - written
        written = replace("team-c", 100 * 2**20)
        refusal = wait_until(lambda: log_lines(gateway, "policy change refused"), timeout=10)
        refused = time.monotonic() - written
        seconds = asyncio.run(response_seconds(5))
        providers = {
            dict(labels).get("gen_ai_system")
            for (name, labels) in scrape(gateway.metrics_url)
            if name.startswith("agentgateway_gen_ai_client_responses")
        }
    print(
        f"3 MiB policy reloaded {reloaded:.2f} s after the write, 100 MB refused {refused:.2f} s after it "
        f"(both include the 2 s the file must settle); responses then took {max(seconds):.3f} s at most"
    )
    assert refusal[0].endswith(
        f"{policy}: the policy file is 104,857,600 bytes, over the limit of 4,194,304; "
        "raise gateway_policy_max_bytes to read it"
    )
    assert reloaded < 5 and refused < 5
    assert max(seconds) < 0.5
    assert providers == {"team-b"}
