"""The path a route is matched on: the one the upstream will serve.

Servers decode a request's path before they route it (uvicorn, so vLLM, LiteLLM and SGLang;
nginx also resolves dot segments and merges slashes): to them `/v1/chat/%63ompletions`,
`/v1/chat%2Fcompletions` and `/v1//x/../chat/completions` are chat completions. Matched raw, such a
spelling would fall through to the passthrough route, unmetered and past every budget. So the
gateway matches the normalised path and sends that same path upstream: what it metered is what
the upstream serves, whichever way the upstream itself would have read the original.

A path with no single reading is refused instead: percent-escapes that do not decode to UTF-8,
control characters, a backslash (a path separator to some servers, not to others), and a `%`
escape still there after one decoding (double encoding: servers that decode once and servers that
decode twice route it differently).
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote_to_bytes

# Kept as they are when the path is encoded again: RFC 3986's unreserved characters (quote's own
# safe set), `/`, and the sub-delimiters and `:@` that a path segment may hold unescaped.
_PATH_SAFE = "/!$&'()*+,;=:@"
_AMBIGUOUS = re.compile(r"[\x00-\x1f\x7f\\]|%[0-9A-Fa-f]{2}")


class AmbiguousPath(ValueError):
    """A request path with no single reading; str() says why, for the client's 400."""


def normalise_target(target: str) -> str:
    """The request target (path and query) with its path normalised: percent-decoded once (`%2F`
    included: a decoding server sees a `/` there), dot segments resolved, empty segments (doubled
    and trailing slashes) dropped, encoded again canonically; the fragment dropped (it is the
    client's own, never part of a route), the query kept as it was. Raises AmbiguousPath."""
    target = target.partition("#")[0]
    path, question, query = target.partition("?")
    if not path.startswith("/"):
        return target  # `*` (OPTIONS) or an authority: nothing a route matches
    try:
        decoded = unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise AmbiguousPath("its percent-escapes do not decode to UTF-8") from None
    if (bad := _AMBIGUOUS.search(decoded)) is not None:
        what = "a percent-escape after decoding" if bad.group().startswith("%") else f"{bad.group()!r}"
        raise AmbiguousPath(f"it holds {what}")
    segments: list[str] = []
    for segment in decoded.split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    normal = quote("/" + "/".join(segments), safe=_PATH_SAFE)
    return f"{normal}?{query}" if question else normal
