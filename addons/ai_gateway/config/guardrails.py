"""Guardrails in the policy (`guardrails:`): what each guard is, and the pure part of a verdict.

A guard checks text a user sent or a model produced. A `regex` guard decides at once, on text
normalised (NFKC, casefolded, invisible format characters removed) so that look-alike spellings
("ｐｒｏｊｅｃｔ", "pro\u200bject", "PROJECT") are caught by one pattern; a `webhook` or
`moderation` guard asks a service, which the proxy does off the relay (accounting/guard_service.py).
"""

from __future__ import annotations

import enum
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field


class GuardKind(enum.StrEnum):
    REGEX = "regex"
    WEBHOOK = "webhook"
    MODERATION = "moderation"


class Phase(enum.StrEnum):
    INPUT = "input"  # what the user sent: text, transcribed speech, HTTP request messages
    OUTPUT = "output"  # what the model produced: text and audio transcript deltas, HTTP responses


class Action(enum.StrEnum):
    """What a guard's match does: block it, let it through marked, or only count it."""

    BLOCK = "block"
    WARN = "warn"
    LOG = "log"


# What a check ended in, the `action` label of guardrail_checks_total: an Action, or these.
ALLOW = "allow"
ERROR = "error"  # the guard service failed or timed out; on_error says whether that blocks
ON_ERROR_OPEN, ON_ERROR_CLOSED = "open", "closed"
DEFAULT_TIMEOUT_MS = 500.0
DEFAULT_BATCH_MS = 50  # how long a moderation check nothing waits for lingers for others to share its request
DEFAULT_BATCH_MAX = 32  # texts in one moderation request at most
BLOCKED_CODE = "guardrail_blocked"  # the stable error code clients see on a block
BUILTIN_DETECTORS = ("email", "phone", "card", "iban")  # redact: built-ins (accounting/redaction.py)
# Invisible characters that split a word without showing: zero-width space, joiners, BOM, soft hyphen.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))


@dataclass(frozen=True, slots=True)
class Guard:
    """One entry of `guardrails:`. deny/allow are compiled with IGNORECASE against normalised text."""

    name: str
    kind: GuardKind
    phases: frozenset[Phase] = frozenset(Phase)
    action: Action = Action.BLOCK
    deny: tuple[re.Pattern[str], ...] = ()
    allow: tuple[re.Pattern[str], ...] = ()
    url: str | None = None
    timeout_ms: float = DEFAULT_TIMEOUT_MS
    on_error: str = ON_ERROR_OPEN
    thresholds: tuple[tuple[str, float], ...] = ()  # moderation category -> score that counts as flagged
    model: str | None = None  # moderation model asked for, when the endpoint needs one
    api_key: str | None = field(default=None, repr=False)  # sent as a bearer token (from key_env)
    max_blocks: int | None = None  # a session this guard blocked more often is closed (None: never)
    batch_ms: float = DEFAULT_BATCH_MS  # moderation: a check no frame waits for lingers this long for a batch
    batch_max: int = DEFAULT_BATCH_MAX  # moderation: texts per request at most

    @property
    def remote(self) -> bool:
        """Whether the verdict comes from a service (asked off the relay), not from the gateway."""
        return self.kind is not GuardKind.REGEX

    def denies(self, normalised: str, after: int = 0) -> bool:
        """Whether a deny pattern matches the normalised text, ending past `after` (a window's carried
        head was checked before), and no allow pattern's match covers it (`project falcon is
        public` allows that phrase, not the text around it)."""
        allowed = [m.span() for a in self.allow for m in a.finditer(normalised)] if self.allow else []
        for pattern in self.deny:
            for match in pattern.finditer(normalised):
                start, end = match.span()
                if end > after and not any(a <= start and end <= b for a, b in allowed):
                    return True
        return False


@dataclass(frozen=True, slots=True)
class Verdict:
    """A guard's check: `outcome` is the metric's action label, `blocks` what the gateway does."""

    guard: str
    outcome: str  # allow, block, warn, log or error
    blocks: bool = False
    reason: str = ""

    @property
    def marks(self) -> bool:
        """Whether the flow is marked: a block, a warning, or an error."""
        return self.outcome in (Action.BLOCK, Action.WARN, ERROR)


def matched(guard: Guard, reason: str = "matched") -> Verdict:
    """The verdict of a guard whose check found its text objectionable."""
    return Verdict(guard.name, guard.action.value, guard.action is Action.BLOCK, reason)


def failed(guard: Guard, why: str) -> Verdict:
    """A guard service that failed or timed out: let through (on_error open) or blocked (closed)."""
    return Verdict(guard.name, ERROR, guard.on_error == ON_ERROR_CLOSED, why)


def allowed(guard: Guard) -> Verdict:
    return Verdict(guard.name, ALLOW)


def first_block(verdicts: Iterable[Verdict]) -> Verdict | None:
    """The verdict that blocks, if any: one block is enough, whatever the others said."""
    return next((v for v in verdicts if v.blocks), None)


@dataclass(frozen=True, slots=True)
class GuardrailPolicy:
    """The policy's guards, each phase's in policy order."""

    guards: tuple[Guard, ...] = ()

    def for_phase(self, phase: Phase) -> tuple[Guard, ...]:
        return tuple(g for g in self.guards if phase in g.phases)

    def max_blocks(self, name: str) -> int | None:
        """How many blocks by the guard named a session may take before it is closed."""
        return next((g.max_blocks for g in self.guards if g.name == name), None)

    def __bool__(self) -> bool:
        return bool(self.guards)


@dataclass(frozen=True, slots=True)
class RedactPolicy:
    """The policy's `redact:`: built-in detectors by name and the operator's patterns."""

    builtin: tuple[str, ...] = ()
    patterns: tuple[re.Pattern[str], ...] = field(default_factory=tuple)

    def __bool__(self) -> bool:
        return bool(self.builtin or self.patterns)


def normalise(text: str) -> str:
    """Text as guards read it: NFKC (full-width and compatibility forms folded), casefolded, and
    without the invisible characters that can split a word."""
    return unicodedata.normalize("NFKC", text).translate(_INVISIBLE).casefold()


def check_regex(guard: Guard, normalised: str, after: int = 0) -> Verdict:
    """A regex guard's verdict on normalised text."""
    return matched(guard) if guard.denies(normalised, after) else allowed(guard)
