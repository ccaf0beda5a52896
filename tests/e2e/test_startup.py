"""Startup behaviour of the real mitmdump with the gateway: clear one-line errors, clean shutdown.

Each gateway here runs its command from nothing (never forked from the tests' fork server): what a
process does while it starts is what these tests are about.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.request

import pytest

from ai_gateway_tools.harness import GatewayProcess

from ..clients import write_padded
from ..conftest import LAUNCHERS

pytestmark = pytest.mark.usefixtures("executed")


def run_until_exit(gateway: GatewayProcess, timeout: float = 30) -> tuple[int, str]:
    result = subprocess.run(gateway.command(), capture_output=True, text=True, timeout=timeout, env=gateway.env)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("policy", "environ", "message"),
    [
        (
            "routes:\n  /realtime: Realtim\n",
            {},
            "policy.yaml:2: routes./realtime: expected one of Completions, Responses, Embeddings, Realtime, Passthrough, TextCompletions, Transcriptions, Translations, Speech, Images, RealtimeCalls, got 'Realtim'",
        ),
        (
            "auth:\n  env: GATEWAY_UNSET_KEY\nroutes:\n  '*': Passthrough\n",
            {},
            "policy.yaml:2: auth.env: environment variable GATEWAY_UNSET_KEY is not set or empty",
        ),
    ],
)
def test_invalid_policy_stops_startup_with_one_line(tmp_path, policy, environ, message):
    path = tmp_path / "policy.yaml"
    path.write_text(policy)
    returncode, output = run_until_exit(
        GatewayProcess("http://127.0.0.1:9", options={"gateway_policy": str(path)}, env=environ)
    )
    assert returncode != 0
    assert message in output
    assert "Traceback" not in output
    assert sum("policy.yaml" in line for line in output.splitlines()) == 1


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_100_mb_policy_stops_startup_at_once_with_one_line(tmp_path, launcher):
    """Valid but 100 MB of comments: refused by its size, unread (pyyaml would take minutes)."""
    path = write_padded(tmp_path / "policy.yaml", "routes:\n  /realtime: Realtime\n", 100 * 2**20)
    started = time.monotonic()
    gateway = GatewayProcess("http://127.0.0.1:9", options={"gateway_policy": str(path)}, launcher=launcher)
    returncode, output = run_until_exit(gateway)
    print(f"a 100 MB policy: exit {returncode} after {time.monotonic() - started:.2f} s")
    assert returncode != 0
    assert time.monotonic() - started < 10
    message = (
        f"{path}: the policy file is 104,857,600 bytes, over the limit of 4,194,304; "
        "raise gateway_policy_max_bytes to read it"
    )
    lines = [line for line in output.splitlines() if "policy.yaml" in line]
    assert len(lines) == 1 and lines[0].endswith(f"ai-gateway: invalid policy: {message}")
    assert "Traceback" not in output


def test_a_policy_size_limit_below_one_byte_stops_startup_with_one_line():
    returncode, output = run_until_exit(GatewayProcess("http://127.0.0.1:9", options={"gateway_policy_max_bytes": "0"}))
    assert returncode != 0
    assert "gateway_policy_max_bytes: expected a positive number, got 0" in output
    assert "Traceback" not in output


def test_invalid_operation_names_stop_startup_with_one_line():
    gateway = GatewayProcess("http://127.0.0.1:9", options={"gateway_operation_names": "otel"})
    returncode, output = run_until_exit(gateway)
    assert returncode != 0
    assert "gateway_operation_names: expected one of ours, agentgateway, got 'otel'" in output
    assert "Traceback" not in output


def test_metrics_port_in_use_is_one_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        returncode, output = run_until_exit(
            GatewayProcess("http://127.0.0.1:9", options={"gateway_metrics_port": str(port)})
        )
    assert returncode != 0
    assert f"ai-gateway: cannot serve metrics on 127.0.0.1:{port}: Address already in use" in output
    assert "Traceback" not in output


def test_sigterm_stops_cleanly_and_frees_the_metrics_port():
    gateway = GatewayProcess("http://127.0.0.1:9").start()
    assert gateway.stop() == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", gateway.metrics_port))


@pytest.mark.parametrize("freeze", [True, False], ids=["default", "off"])
def test_startup_objects_are_frozen_out_of_the_garbage_collector(freeze):
    """With gateway_gc_freeze (the default) the running gateway has moved startup's objects into the
    permanent generation: far more than a hundred thousand (mitmproxy, the price database)."""
    options = {"termlog_verbosity": "debug", "gateway_gc_freeze": str(freeze).lower()}
    with GatewayProcess("http://127.0.0.1:9", options=options) as gateway:
        # a connection handled (and dropped: nothing listens upstream) comes after the running hook returned
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{gateway.url}/v1/models", timeout=10)
        log = gateway.log()
    frozen = re.search(r"ai-gateway: (\d+) startup objects frozen", log)
    if freeze:
        assert frozen is not None and int(frozen.group(1)) > 100_000
    else:
        assert frozen is None
