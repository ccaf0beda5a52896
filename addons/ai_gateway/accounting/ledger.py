"""The durable usage ledger: one JSON line per metered response, appended and flushed as it happens.

Prometheus counters reset when the gateway restarts; the ledger does not, so spend can be
reconciled against the upstream's bill. A line is flushed before the response is relayed to the
client, so every response a client saw finish is in the ledger even if the gateway is killed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from ai_gateway.accounting.metrics import ModelLabels
from ai_gateway.accounting.usage import CharacterUsage, DurationUsage, TokenUsage

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Source:
    """Where billed usage came from: the flow (a whole WebSocket session, or one HTTP exchange)."""

    flow_id: str
    route_type: str
    client_key: str = "anonymous"  # the client's identity: a known key's name, a digest prefix, or anonymous
    session: bool = False  # a WebSocket session (its flow id is the session's), not one HTTP exchange


Usage = TokenUsage | DurationUsage | CharacterUsage


def usage_fields(usage: Usage | None) -> dict[str, Any]:
    if usage is None:
        return {"usage": None}  # a response whose usage could not be read
    if isinstance(usage, DurationUsage):
        return {"audio_seconds": usage.seconds}
    if isinstance(usage, CharacterUsage):
        return {"input_characters": usage.characters}
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
    def __init__(self, path: str) -> None:
        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 (lives as long as the ledger)
        self._failed = False

    def append(
        self,
        source: Source,
        labels: ModelLabels,
        usage: Usage | None,
        status: str | None,
        response_id: str | None,
        cost_usd: float | None,
    ) -> None:
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
        try:
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._file.flush()
        except OSError as e:
            if not self._failed:  # once: a full disk must not flood the log on every response
                logger.error("ai-gateway: cannot write the usage ledger %s: %s", self.path, e)
            self._failed = True

    def close(self) -> None:
        self._file.close()
