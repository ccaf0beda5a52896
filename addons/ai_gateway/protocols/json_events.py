"""JSON events on the wire: decoding that fails as a usage item, and reading an event's type unread.

Most frames of a voice session are audio deltas of 6-100 KB of base64 and every hook runs on
the relay's event loop, so a frame's type is read from its first bytes and only the few metered
events are ever decoded.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ai_gateway.accounting.items import Malformed

# OpenAI's servers send each event's type first; this reads it without decoding the frame.
_LEADING_TYPE = re.compile(rb'\s*\{\s*"type"\s*:\s*"([a-z0-9_.]{1,128})"')


def leading_type(content: bytes) -> str | None:
    """The event type when the frame starts with it, as OpenAI's events do; read without decoding."""
    match = _LEADING_TYPE.match(content)
    return match.group(1).decode() if match else None


def decode_json(data: bytes, not_object: str = "invalid_json") -> dict[str, Any] | Malformed:
    """A JSON object, or why the data is not one (hostile nesting included); `not_object` is the
    reason given for valid JSON that is not an object."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as e:
        return Malformed("invalid_json", str(e)[:200])
    return (
        value if isinstance(value, dict) else Malformed(not_object, f"expected an object, got {type(value).__name__}")
    )
