"""Personal data kept out of what the gateway stores (`redact:`): e-mail addresses, phone numbers,
payment card numbers (Luhn-checked), IBANs (mod-97-checked) and the operator's patterns, each
replaced by `[redacted:<what>]`.

Applied only to what the gateway keeps or exports, never to what it relays. The checksums keep
order numbers and timestamps that merely look like cards or IBANs readable.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ai_gateway.config.guardrails import RedactPolicy

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
# Printed in groups of four (the last one shorter) or all in one.
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b", re.IGNORECASE)
# International (+ and 8-15 digits) or national numbers of 9-15 digits, with the usual separators.
_PHONE = re.compile(r"(?<![\w+])(?:\+\d[\d ().-]{6,18}\d|\(?\d[\d ().-]{7,18}\d)(?!\w)")


def luhn(digits: str) -> bool:
    """The Luhn checksum every payment card number passes."""
    total = 0
    for i, char in enumerate(reversed(digits)):
        n = int(char)
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    """ISO 13616's check: the country and check digits moved to the end, the whole mod 97 is 1."""
    iban = candidate.replace(" ", "").upper()
    if not 15 <= len(iban) <= 34:
        return False
    return int("".join(str(int(c, 36)) for c in iban[4:] + iban[:4])) % 97 == 1


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


def _is_card(text: str) -> bool:
    digits = _digits(text)
    return 13 <= len(digits) <= 19 and luhn(digits)


def _is_phone(text: str) -> bool:
    """8-15 digits with a country code, else 9-15: a date (2024-01-15) is not one."""
    return (8 if text.startswith("+") else 9) <= len(_digits(text)) <= 15


Detector = tuple[str, re.Pattern[str], Callable[[str], bool] | None]
# Cards and IBANs before phone numbers, which would otherwise take their digits.
BUILTINS: dict[str, Detector] = {
    "email": ("email", _EMAIL, None),
    "card": ("card", _CARD, _is_card),
    "iban": ("iban", _IBAN, iban_valid),
    "phone": ("phone", _PHONE, _is_phone),
}


class Redactor:
    """The detectors a policy names, applied in turn; `redact` leaves text without a match as it is."""

    def __init__(self, policy: RedactPolicy) -> None:
        self.detectors: list[Detector] = [BUILTINS[name] for name in BUILTINS if name in policy.builtin]
        self.detectors += [("pattern", pattern, None) for pattern in policy.patterns]

    def __bool__(self) -> bool:
        return bool(self.detectors)

    def redact(self, text: str) -> str:
        for label, pattern, valid in self.detectors:
            text = pattern.sub(_replacer(f"[redacted:{label}]", valid), text)
        return text

    def redact_value(self, value: Any) -> Any:
        """A decoded JSON value with every string in it redacted (keys left as they are)."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {key: self.redact_value(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.redact_value(item) for item in value]
        return value


def _replacer(replacement: str, valid: Callable[[str], bool] | None) -> Callable[[re.Match[str]], str]:
    """A match replaced when its checksum (if the detector has one) passes."""
    return lambda m: replacement if valid is None or valid(m.group()) else m.group()
