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

# An event's type as a member `"type": "<name>"`. Inside a JSON string every `"` is escaped, so the
# pattern can only be a member name and its value; an escaped name (`response\u002ecreate`) does
# not match, and such a frame is decoded in full.
_TYPE_MEMBER = re.compile(rb'"type"\s*:\s*"([a-z0-9_.]{1,128})"')
# The type as the last member of the event: what servers that sort keys (openai-python models
# serialised alphabetically) send. One closing brace after it means the top level.
_TRAILING_TYPE = re.compile(rb'"type"\s*:\s*"([a-z0-9_.]{1,128})"\s*\}\s*$')
# Where the type is looked for: near the start (OpenAI puts it first; pipecat and DashScope put
# `event_id` before it) and at the very end; never in the middle of a 100 KB audio payload.
HEAD_BYTES = 512
TAIL_BYTES = 256


def event_type(content: bytes) -> str | None:
    """The event's top-level type, read without decoding the frame; None when it is not plainly
    near the start or at the end (then only decoding can tell).

    Near the start, the member counts as the event's own only when no object or array opened
    before it: `{"event_id": "e1", "type": ...}` does, `{"response": {"type": ...` does not.
    """
    head = _TYPE_MEMBER.search(content, 0, HEAD_BYTES)
    if head is not None and content.count(b"{", 0, head.start()) == 1 and content.find(b"[", 0, head.start()) < 0:
        return head.group(1).decode()
    tail = _TRAILING_TYPE.search(content, max(len(content) - TAIL_BYTES, 0))
    return tail.group(1).decode() if tail is not None else None


def names_type_twice(content: bytes) -> bool:
    """Whether the frame names a type twice (`{"type": "a", ..., "type": "b"}`): which one a server
    honours is its parser's choice, so such a frame must be decoded, not classified by its first.

    Cheap on an audio append: the stretch between the two quotes after its `"audio"` key holds no
    quote, so no `"type"` can lie inside it, and it is skipped with two memchr-fast finds instead
    of searched (a 48 KB append: 0.3 µs, not 77 µs). Whatever that stretch really is (the audio,
    or another string), a `"type"` outside it is still counted, and the stretch itself is one
    when it is exactly `"type"`."""
    key = content.find(b'"audio"')
    opening = content.find(b'"', key + 7) if key >= 0 else -1
    closing = content.find(b'"', opening + 1) if opening >= 0 else -1
    if closing < 0:
        return content.count(b'"type"') > 1
    found = content.count(b'"type"', 0, opening + 1) + content.count(b'"type"', closing)
    return found + (content[opening : closing + 1] == b'"type"') > 1


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
