"""Google's Gemini Live API (`BidiGenerateContent`) over WebSocket: frames turned into usage items.

One adapter serves AI Studio (`google.ai.generativelanguage.v1beta|v1alpha.GenerativeService.
BidiGenerateContent`, and `...Constrained` for ephemeral tokens) and Vertex AI
(`google.cloud.aiplatform.v1|v1beta1.LlmBidiService/BidiGenerateContent`). Both send JSON in
text or binary frames (Google's SDK decodes either), so both are read alike.

The model comes from the client's first message, `{"setup": {"model": "models/..."}}`; the
server never names one. It is reported without its resource path (`models/`, or Vertex's
`projects/.../publishers/google/models/`), as price lists and dashboards name models.

Usage is the `usageMetadata` a server message may carry beside its content. Google's SDK hands
each one to the application as is (`LiveServerMessage.usage_metadata`); reports are per turn
(each turn's prompt count grows because the conversation is re-sent, so a session's bill is the
sum over turns), and third-party clients report that a turn's figures can be repeated within
the turn. So each token is counted once this way: within a turn each report replaces the one
before, and the turn's last report is billed when the turn ends (`turnComplete`; a turn cut off
by `interrupted` ends at its `turnComplete` or when the model starts its next turn, billed as
`cancelled`; a turn still open when the session closes is billed as `incomplete`). A report
arriving after its turn ended, before the model says anything new, is billed at once.

Mapping to TokenUsage: input = promptTokenCount + toolUsePromptTokenCount (tool results fed back
to the model are input), cache read = cachedContentTokenCount (part of the prompt), output =
responseTokenCount (Vertex: candidatesTokenCount) + thoughtsTokenCount, reasoning = thoughts.
Modalities: TEXT, AUDIO and IMAGE as such; VIDEO as image (video reaches the model as image
frames, and Google prices image and video input alike); DOCUMENT and unspecified as text. A
count without details is text, thoughts are text, and text is what audio and image leave of each
total (TokenUsage), so splits add up to their totals. Counts Google leaves out are zero (proto3
JSON omits zeros).

Most server frames are audio: `{"serverContent": {"modelTurn": {"parts": [{"inlineData":
{"mimeType": "audio/pcm...", "data": "<base64>"}}]}}}`. Base64 has no quote, so such a frame is
classified by matching its head and searching for the quote ending the data; only what follows
is looked at, and the frame is decoded only if a metered key appears there.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from ai_gateway.accounting.items import Malformed, ResponseDone, SessionModels, UsageItem
from ai_gateway.accounting.usage import InvalidUsage, TokenUsage
from ai_gateway.protocols.encoding import DEFAULT_MAX_BODY_BYTES
from ai_gateway.protocols.json_events import MAX_CLIENT_EVENT_BYTES, decode_json, read_event, too_large
from ai_gateway.protocols.usage_fields import require_object, tokens

COMPLETED, CANCELLED, INCOMPLETE = "completed", "cancelled", "incomplete"
MODALITIES = {"TEXT": "text", "AUDIO": "audio", "IMAGE": "image", "VIDEO": "image", "DOCUMENT": "text"}
MAX_DETAILS = 16  # modality entries per list; Google sends at most one per modality
SETUP = ("setup",)  # the one client message that is read, in any key order and spelling

# The head of a media frame, up to where its base64 data begins.
_MEDIA_HEAD = re.compile(
    rb'\s*\{\s*"serverContent"\s*:\s*\{\s*"modelTurn"\s*:\s*\{\s*"parts"\s*:\s*\[\s*'
    rb'\{\s*"inlineData"\s*:\s*\{\s*"mimeType"\s*:\s*"[^"\\]{0,64}"\s*,\s*"data"\s*:\s*"'
)
_METERED_KEYS = (b'"usageMetadata"', b'"turnComplete"', b'"interrupted"')
_RATE = re.compile(r"rate=(\d{1,6})")
INPUT_RATE, OUTPUT_RATE = 16_000, 24_000  # Google's PCM16 rates where a mime type names none
MAX_AUDIO_DEPTH = 8  # audio sits 4 (serverContent.modelTurn.parts[].inlineData) or 3 levels deep
_MODEL_OUTPUT_KEYS = (b'"modelTurn"', b'"toolCall"')


class GeminiLiveProtocol:
    """One Live session's frames as usage items, holding each turn's latest report until the turn ends."""

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes  # of a server frame; client frames read at most MAX_CLIENT_EVENT_BYTES
        self.setup_seen = False
        self.pending: TokenUsage | None = None  # the open turn's latest report, not yet billed
        self.interrupted = False  # the open turn was cut off; billed as cancelled
        self.ended = False  # a turn completed and the model has said nothing since

    def client_frame(self, content: bytes, is_text: bool) -> UsageItem | None:
        """The setup message's model; nothing after it is read (media, turns)."""
        if self.setup_seen:
            return None
        limit = min(self.max_frame_bytes, MAX_CLIENT_EVENT_BYTES)
        message = read_event(content, SETUP, limit)
        if message is None:
            return None
        if message.too_large:
            return too_large(content, limit)
        if not isinstance(setup := message.members.get("setup"), dict):
            return None  # not the setup message; the upstream will refuse the session itself
        self.setup_seen = True
        model = setup.get("model")
        return SessionModels(model=model_name(model) if isinstance(model, str) else None, transcription_model=None)

    def server_frame(self, content: bytes, is_text: bool) -> UsageItem | None:
        tail = media_tail(content)
        if tail is not None:
            if not any(key in tail for key in _METERED_KEYS):
                return self.model_output()
        elif not any(key in content for key in _METERED_KEYS):
            return self.model_output() if any(key in content for key in _MODEL_OUTPUT_KEYS) else None
        return self.read_message(content)

    def closed(self) -> UsageItem | None:
        """The session ended: a turn still holding a report is billed as it stands."""
        return self.bill(CANCELLED if self.interrupted else INCOMPLETE)

    def model_output(self) -> UsageItem | None:
        """The model produced content; after an interruption that starts its next turn."""
        self.ended = False
        return self.bill(CANCELLED) if self.interrupted else None

    def bill(self, status: str) -> ResponseDone | None:
        usage, self.pending, self.interrupted = self.pending, None, False
        return None if usage is None else ResponseDone(usage=usage, status=status)

    def read_message(self, content: bytes) -> UsageItem | None:
        message = decode_json(content, limit=self.max_frame_bytes)
        if isinstance(message, Malformed):
            return message
        server_content = message.get("serverContent")
        if not isinstance(server_content, dict):
            server_content = {}
        earlier = None
        if server_content.get("modelTurn") is not None or message.get("toolCall") is not None:
            earlier = self.model_output()
        if "usageMetadata" in message:
            try:
                usage = parse_usage_metadata(message["usageMetadata"])
            except InvalidUsage as e:
                return Malformed("invalid_usage", f"usageMetadata: {e}")
            if self.ended and self.pending is None and not server_content.get("turnComplete"):
                return ResponseDone(usage=usage, status=COMPLETED)  # the report of a turn that already ended
            self.pending = usage
        if server_content.get("interrupted") is True:
            self.interrupted = True
        if server_content.get("turnComplete") is True:
            self.ended = True
            return self.bill(CANCELLED if self.interrupted else COMPLETED)
        return earlier


def media_tail(content: bytes) -> bytes | None:
    """What follows the base64 data of a media frame (from the quote that ends it); None when the
    frame does not start as one. Read without decoding: base64 has no quote."""
    head = _MEDIA_HEAD.match(content)
    if head is None:
        return None
    end = content.find(b'"', head.end())
    return content[end:] if end >= 0 else b""


def audio_slots(message: Any) -> Iterator[dict[str, Any]]:
    """The objects of a message that hold base64 audio (`{"data", "mimeType": "audio/..."}`): the
    model's `inlineData` parts, the client's `realtimeInput.audio` and `mediaChunks`, in either
    spelling; looked for MAX_AUDIO_DEPTH levels deep at most (a hostile message may nest further)."""
    stack = [(message, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            mime = value.get("mimeType", value.get("mime_type"))
            if isinstance(value.get("data"), str) and isinstance(mime, str) and mime.startswith("audio/"):
                yield value
                continue
            children = list(value.values())
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth < MAX_AUDIO_DEPTH:
            stack.extend((child, depth + 1) for child in reversed(children))


def audio_rate(mime: str, default: int) -> int:
    """The sample rate a PCM mime type names (`audio/pcm;rate=16000`), else `default` (Google's: 16 kHz
    in, 24 kHz out)."""
    rate = _RATE.search(mime)
    return int(rate.group(1)) if rate and int(rate.group(1)) > 0 else default


def describe_audio(slot: dict[str, Any], default_rate: int) -> str:
    """What an audio slot holds, from its base64 length: `<audio audio/pcm;rate=24000: 9,600 bytes, 200 ms>`."""
    data, mime = slot["data"], slot.get("mimeType", slot.get("mime_type"))
    size = (len(data) - len(data[-2:]) + len(data[-2:].rstrip("="))) * 3 // 4
    return f"<audio {mime}: {size:,} bytes, {size / (audio_rate(mime, default_rate) * 2 / 1000):,.0f} ms>"


def model_name(resource: str) -> str:
    """`models/gemini-2.0-flash-live-001` and Vertex's `projects/p/locations/l/publishers/google/models/x`
    as the model's own name."""
    return resource.rpartition("models/")[2] or resource


def parse_usage_metadata(metadata: Any) -> TokenUsage:
    """A Live `usageMetadata` as TokenUsage, validated strictly (see the module docstring)."""
    metadata = require_object(metadata)
    prompt = _count(metadata, "promptTokenCount")
    tool_use = _count(metadata, "toolUsePromptTokenCount")
    response_key = "responseTokenCount" if "responseTokenCount" in metadata else "candidatesTokenCount"
    response_details = "responseTokensDetails" if "responseTokensDetails" in metadata else "candidatesTokensDetails"
    response = _count(metadata, response_key)
    thoughts = tokens(metadata, "thoughtsTokenCount", required=False)
    cached = tokens(metadata, "cachedContentTokenCount", required=False)
    output_parts = [(response, _details(metadata, response_details))]
    if thoughts:
        output_parts.append((thoughts, (("text", thoughts),)))
    return TokenUsage(
        input=prompt + tool_use,
        output=response + (thoughts or 0),
        cache_read=cached,
        input_by_modality=_split(
            [
                (prompt, _details(metadata, "promptTokensDetails")),
                (tool_use, _details(metadata, "toolUsePromptTokensDetails")),
            ]
        ),
        cache_read_by_modality=_split([(cached or 0, _details(metadata, "cacheTokensDetails"))]),
        output_by_modality=_split(output_parts),
        reasoning=thoughts,
    )


def _count(metadata: Mapping[str, Any], key: str) -> int:
    count = tokens(metadata, key, required=False)
    return 0 if count is None else count


def _details(metadata: Mapping[str, Any], key: str) -> tuple[tuple[str, int], ...] | None:
    """A `[{modality, tokenCount}]` list as (modality, count) pairs; None when absent."""
    entries = metadata.get(key)
    if entries is None:
        return None
    if not isinstance(entries, list) or len(entries) > MAX_DETAILS:
        raise InvalidUsage(f"{key} is not a list of at most {MAX_DETAILS} modality counts")
    pairs = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise InvalidUsage(f"{key} has {type(entry).__name__}, expected a modality count")
        modality = entry.get("modality", "MODALITY_UNSPECIFIED")
        if not isinstance(modality, str):
            raise InvalidUsage(f"{key} modality is {modality!r}, expected a name")
        pairs.append((MODALITIES.get(modality, "text"), _count(entry, "tokenCount")))
    return tuple(pairs)


def _split(parts: list[tuple[int, tuple[tuple[str, int], ...] | None]]) -> tuple[tuple[str, int], ...]:
    """Per-modality sums over the parts of a total; a part without details is text."""
    sums: dict[str, int] = {}
    for count, details in parts:
        for modality, n in details if details is not None else (("text", count),):
            sums[modality] = sums.get(modality, 0) + n
    return tuple(sums.items())
