"""scripts/debug --drive: a developer opening mitmweb finds a voice session with every kind of turn."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ai_gateway_tools.debug import TOOL, TRUNCATED_MS
from ai_gateway_tools.harness import free_port

from ..clients import wait_until
from .test_secrets_mitmweb import fetch


@pytest.mark.slow
def test_debug_drive_leaves_a_session_with_every_kind_of_turn(tmp_path: Path) -> None:
    web_port = free_port()
    command = [sys.executable, "-m", "ai_gateway_tools.debug", "--drive", "--port", str(free_port())]
    with tempfile.TemporaryFile() as output:
        debug = subprocess.Popen([*command, "--web-port", str(web_port)], stdout=output, stderr=subprocess.STDOUT)
        try:
            log = lambda: (output.seek(0), output.read().decode())[1]  # noqa: E731
            wait_until(lambda: "Ctrl-C stops" in log() or debug.poll() is not None, timeout=60)
            token = re.search(r"token=(\w+)", log())
            assert token is not None and debug.poll() is None, log()
            fetch(f"http://127.0.0.1:{web_port}", "/commands/realtime.export", token.group(1), ["@all", str(tmp_path)])
        finally:
            debug.send_signal(signal.SIGTERM)
            assert debug.wait(30) == 0
    (bundle,) = tmp_path.iterdir()
    turns = json.loads((bundle / "turns.json").read_text())["turns"]
    answers = [t for t in turns if t["role"] == "assistant"]
    assert [t["status"] for t in answers] == ["completed", "cancelled", "completed", "completed", "completed"]
    assert {"interrupted: the user spoke", "cancelled by the client"} <= set(answers[1]["notes"])
    assert f"truncated at {TRUNCATED_MS} ms of audio (what the user heard)" in answers[1]["notes"]
    assert [c["name"] for c in answers[3]["calls"]] == [TOOL]
    assert [t["role"] for t in turns].count("tool") == 1 and sum(t["voice"] for t in turns if t["role"] == "user") >= 3
    assert all(t["cost_usd"] > 0 for t in answers)
