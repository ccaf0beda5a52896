"""JSON events on the wire: decoding that fails as a usage item, and reading an event's type unread.

Most frames of a voice session are audio deltas of 6-100 KB of base64 and every hook runs on
the relay's event loop, so a frame's type is read from its first bytes and only the few metered
events are ever decoded. A client event is read by read_event() in any key order and spelling
(what json.loads would make of it), and decoded only when it may be one the gateway meters.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Collection
from dataclasses import dataclass
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
# A top-level string member, name and value unescaped, as head_strings() reads them.
_STRING_MEMBER = re.compile(rb'[{,]\s*"([^"\\]{1,64})"\s*:\s*"([^"\\]{0,256})"')
# Client events the gateway decodes (response.create, an audio commit, Gemini Live's setup) are
# small; a client frame larger than this is read from its head and tail only (read_event).
MAX_CLIENT_EVENT_BYTES = 1 << 20


def event_type(content: bytes) -> str | None:
    """The event's top-level type, read without decoding the frame; None when it is not plainly
    near the start or at the end (then only decoding can tell).

    Near the start, the member counts as the event's own only when no object or array opened
    before it: `{"event_id": "e1", "type": ...}` does, `{"response": {"type": ...` does not.
    """
    head = _TYPE_MEMBER.search(content, 0, HEAD_BYTES)
    if head is not None and _at_top(content, head.start()):
        return head.group(1).decode()
    tail = _TRAILING_TYPE.search(content, max(len(content) - TAIL_BYTES, 0))
    return tail.group(1).decode() if tail is not None else None


def _at_top(content: bytes, start: int) -> bool:
    """Whether a member found at `start` is the event's own: no object or array opened before it."""
    return content.count(b"{", 0, start) == 1 and content.find(b"[", 0, start) < 0


def may_name(content: bytes, names: Collection[bytes]) -> bool:
    """Whether some JSON string of the frame may be one of `names` (each quoted, plain `[a-z0-9._]`):
    only when the frame spells it verbatim, or holds a `\\u` escape, the one escape that can
    spell such characters. False is certain, so such a frame can be left undecoded whatever its
    key order or spelling.

    Cheap on an audio append: the stretch between the two quotes after its `"audio"` key holds no
    quote, so no quoted name can lie inside it, and it is skipped with two memchr-fast finds instead
    of searched, for the names and for escapes (a 48 KB append: about 1 µs, not 20 µs per name).
    Whatever that stretch really is (the audio, or another string), a name outside it is still
    found, and the stretch itself is one when it is exactly a quoted name, spelled plainly or, if it
    is short enough to be one spelled with escapes (six bytes a character), with a `\\u`."""
    key = content.find(b'"audio"')
    opening = content.find(b'"', key + 7) if key >= 0 else -1
    closing = content.find(b'"', opening + 1) if opening >= 0 else -1
    if closing < 0:
        return b"\\u" in content or any(name in content for name in names)
    if content.find(b"\\u", 0, opening + 1) >= 0 or content.find(b"\\u", closing) >= 0:
        return True
    if closing - opening <= 6 * max(map(len, names), default=0) and content.find(b"\\u", opening, closing) >= 0:
        return True  # the stretch may be a name spelled with escapes
    return any(
        content.find(name, 0, opening + 1) >= 0
        or content.find(name, closing) >= 0
        or (closing + 1 - opening == len(name) and content.startswith(name, opening))
        for name in names
    )


def head_strings(content: bytes) -> dict[str, str]:
    """The event's own string members near its start, read unescaped (`{"type": "x", "model": "y",
    ...`): those before any object or array opens, as event_type() takes the type."""
    members: dict[str, str] = {}
    for match in _STRING_MEMBER.finditer(content, 0, HEAD_BYTES):
        if not _at_top(content, match.start(1)):
            break
        members.setdefault(match.group(1).decode(errors="replace"), match.group(2).decode(errors="replace"))
    return members


@dataclass(frozen=True, slots=True)
class Event:
    """A client event's top level as admission reads it.

    types: every top-level `type` member, in order (a frame naming it twice gives both, for
    which one a server honours is its parser's choice, and a budget must not depend on it).
    members: the top-level members, the last of a duplicate winning as in json.loads.
    Too large to decode: types are those it may be (the type its head or tail names, and each of
    the names asked about that it spells verbatim; none when its type cannot be read, so that it
    may be any), members its head's string members, and too_large is set.
    """

    types: tuple[str, ...]
    members: dict[str, Any]
    too_large: bool = False

    def may_be(self, kind: str) -> bool:
        """Whether the event is of this type: named so, or too large to tell otherwise."""
        return kind in self.types or (self.too_large and not self.types)

    @property
    def unread(self) -> str | None:
        """Why what admission asks of the event may be missing: None when it was decoded."""
        return "too_large" if self.too_large else None


def read_event(content: bytes, names: Collection[str], limit: int = MAX_CLIENT_EVENT_BYTES) -> Event | None:
    """The event, when some string of it may be one of `names` (types, or member names); None when
    none can be, or it is not a JSON object.

    Only such frames are decoded, and only up to `limit` bytes: a larger one (a conversation item
    of images, an 8 MB array) would cost the relay many times its size in objects and block every
    session meanwhile. It is read with bounded work instead (see Event).
    """
    wanted = quoted(names) if isinstance(names, tuple) else [b'"' + n.encode() + b'"' for n in names]
    if not may_name(content, wanted):
        return None
    if len(content) > limit:
        kind = event_type(content)
        spelled = tuple(name for name, q in zip(names, wanted, strict=True) if q in content and name != kind)
        return Event((kind, *spelled) if kind else (), head_strings(content), too_large=True)
    top: list[tuple[str, Any]] = []

    def members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal top
        top = pairs  # objects close innermost first: the last one is the event itself
        return dict(pairs)

    try:
        event = json.loads(content, object_pairs_hook=members)
    except (ValueError, RecursionError):
        return None
    if not isinstance(event, dict):
        return None
    return Event(tuple(value for key, value in top if key == "type" and isinstance(value, str)), event)


@functools.lru_cache(maxsize=32)
def quoted(names: tuple[str, ...]) -> tuple[bytes, ...]:
    """The names as may_name() looks for them, made once per set of names (the adapters' constants)."""
    return tuple(b'"' + name.encode() + b'"' for name in names)


def too_large(content: bytes, limit: int) -> Malformed:
    """A frame the gateway relays unread: counted as parse_errors_total{reason=too_large}."""
    return Malformed("too_large", f"{len(content)} bytes, more than {limit}")


def decode_json(data: bytes, not_object: str = "invalid_json", limit: int | None = None) -> dict[str, Any] | Malformed:
    """A JSON object, or why the data is not one (hostile nesting included); `not_object` is the
    reason given for valid JSON that is not an object. Data over `limit` bytes is not decoded."""
    if limit is not None and len(data) > limit:
        return too_large(data, limit)
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as e:
        return Malformed("invalid_json", str(e)[:200])
    return (
        value if isinstance(value, dict) else Malformed(not_object, f"expected an object, got {type(value).__name__}")
    )
