"""The durable usage ledger: one JSON line per metered response, appended and flushed as it happens.

Prometheus counters reset when the gateway restarts; the ledger does not, so spend can be
reconciled against the upstream's bill. A line is flushed before the response is relayed to the
client, so every response a client saw finish is in the ledger even if the gateway is killed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ai_gateway.accounting.metrics import ModelLabels
from ai_gateway.accounting.usage import CharacterUsage, DurationUsage, SessionSeconds, TokenUsage

CONTINUE, REFUSE = "continue", "refuse"
USAGE_LOG = "usage_log"  # the refusal scope while the ledger cannot be written (`refuse`)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Source:
    """Where billed usage came from: the flow (a whole WebSocket session, or one HTTP exchange)."""

    flow_id: str
    route_type: str
    client_key: str = "anonymous"  # the client's identity: a known key's name, a digest prefix, or anonymous
    session: bool = False  # a WebSocket session (its flow id is the session's), not one HTTP exchange


Usage = TokenUsage | DurationUsage | CharacterUsage | SessionSeconds


def usage_fields(usage: Usage | None) -> dict[str, Any]:
    if usage is None:
        return {"usage": None}  # a response whose usage could not be read
    if isinstance(usage, DurationUsage):
        return {"audio_seconds": usage.seconds}
    if isinstance(usage, CharacterUsage):
        return {"input_characters": usage.characters}
    if isinstance(usage, SessionSeconds):
        return {"session_seconds": usage.seconds, "active_seconds": usage.active, "paused_seconds": usage.paused}
    fields: dict[str, Any] = {"input_tokens": usage.input, "output_tokens": usage.output}
    optional = {
        "cached_tokens": usage.cache_read,
        "reasoning_tokens": usage.reasoning,
        "input_by_modality": dict(usage.input_by_modality) or None,
        "cached_by_modality": dict(usage.cache_read_by_modality) or None,
        "output_by_modality": dict(usage.output_by_modality) or None,
    }
    fields.update((key, value) for key, value in optional.items() if value is not None)
    return fields


class UsageLedger:
    """Appends with one `write(2)` per line on an O_APPEND descriptor: lines from several workers
    sharing the file never interleave, and no user-space buffer holds a line back after a failure.

    A failure (full disk, quota, I/O error) loses that line and starts a failure episode, logged
    once; the first write that succeeds again ends it, logged once. A line cut short by the
    failure is terminated by the next write, so every complete line stays valid JSON.
    With `refuse`, `admits()` tells the gateway to refuse new work during an episode; it probes
    the file (a newline) at most once per PROBE_SECONDS so that the episode can end while nothing
    is metered.
    """

    PROBE_SECONDS = 1.0

    def __init__(self, path: str, on_error: str = CONTINUE) -> None:
        self.path = path
        self.on_error = on_error
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        self.failing = False
        self.lost = 0  # lines lost in the current failure episode
        self._cut = False  # the file ends in a line cut short by a failed write
        self._next_probe = 0.0

    def append(
        self,
        source: Source,
        labels: ModelLabels,
        usage: Usage | None,
        status: str | None,
        response_id: str | None,
        cost_usd: float | None,
    ) -> bool:
        """Write one response's line; False if it could not be written (it is lost)."""
        record = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "flow_id": source.flow_id,
            "route": source.route_type,
            "client_key": source.client_key,
            "operation": labels.operation,
            "system": labels.system,
            "request_model": labels.request_model,
            "response_model": labels.response_model,
            "response_id": response_id,
            "status": status,
            **usage_fields(usage),
            "cost_usd": cost_usd,
        }
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        if self._write(b"\n" + line if self._cut else line):
            return True
        self.lost += 1
        return False

    def admits(self) -> bool:
        """Whether new requests and responses may start: always with `continue`; with `refuse`,
        only while lines can be written."""
        if self.on_error != REFUSE or not self.failing:
            return True
        now = time.monotonic()
        if now < self._next_probe:
            return False
        self._next_probe = now + self.PROBE_SECONDS
        return self._write(b"\n")

    def _write(self, data: bytes) -> bool:
        sent = 0
        try:
            while sent < len(data):
                sent += os.write(self._fd, data[sent:])
        except OSError as e:
            if sent:
                self._cut = not data[:sent].endswith(b"\n")
            if not self.failing:  # once per episode: a full disk must not flood the log on every response
                consequence = "new requests are refused" if self.on_error == REFUSE else "usage goes unrecorded"
                logger.error(
                    "ai-gateway: cannot write the usage ledger %s: %s; %s until it can be written",
                    self.path,
                    e.strerror or e,
                    consequence,
                )
                self.failing = True
            return False
        self._cut = False
        if self.failing:
            logger.warning("ai-gateway: usage ledger %s is written again; %d lines were lost", self.path, self.lost)
            self.failing, self.lost = False, 0
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


BLOCK = 1 << 16


def recent_records(path: str, since: datetime) -> Iterator[dict[str, Any]]:
    """The ledger's records from `since` on, newest first, read backwards from the end so that a
    ledger of months costs only its last window; unreadable lines are skipped."""
    try:
        file = open(path, "rb")  # noqa: SIM115 (closed below, also when the caller stops early)
    except OSError:
        return
    with file:
        position = file.seek(0, 2)
        tail = b""
        while position > 0:
            start = max(position - BLOCK, 0)
            file.seek(start)
            lines = (file.read(position - start) + tail).split(b"\n")
            position = start
            tail = lines.pop(0) if position > 0 else b""
            for line in reversed(lines):
                record = _record(line)
                if record is None:
                    continue
                if record["time"] < since:
                    return
                yield record


def _record(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
        record["time"] = datetime.fromisoformat(record["time"])
    except (ValueError, TypeError, KeyError):
        return None
    return record if isinstance(record, dict) else None
