"""Personal data in dialogue text, found offline: e-mail addresses, phone numbers, payment card numbers, IBANs
and IP addresses; and its redaction into typed placeholders ([EMAIL_1], [PHONE_2]...) that are consistent
within a conversation.

Person names are NOT detected: every well-kept name detector (Presidio's PERSON, spaCy's NER) needs a trained
language model that this project cannot install or download; a regex for names would be a fake. Only the
standard library and `phonenumbers` are used, so it lives in assistant/: the trainer (train.sft --redact, the
dataset doctor) and the server (serve.feedback's exports, which may not import train) share one set of detectors.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import phonenumbers

logger = logging.getLogger(__name__)

DEFAULT_REGION = "US"  # phone numbers written without a country code are read as this country's
KINDS = ("email", "iban", "card", "ip", "phone")  # also the priority when two findings overlap
LABELS = {"email": "EMAIL", "iban": "IBAN", "card": "CARD", "ip": "IP", "phone": "PHONE"}
NAMES = {  # (one, many): how the doctor counts them
    "email": ("e-mail address", "e-mail addresses"),
    "phone": ("phone number", "phone numbers"),
    "card": ("card number", "card numbers"),
    "iban": ("IBAN", "IBANs"),
    "ip": ("IP address", "IP addresses"),
}
NOT_DETECTED = "names, postal addresses, and account numbers or PINs that pass no checksum are not detected"

EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,24}(?![\w-])")
# 13 to 19 digits, single spaces or dashes allowed between them; no digit (or digit group) glued on either side.
CARD = re.compile(r"(?<![\d.,-])\d(?:[ -]?\d){12,18}(?![\d]|[.,-]\d)")
# Two letters, two check digits, then up to 30 letters/digits, optionally in groups of four split by spaces.
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
# Version strings are not addresses: a dotted quad glued to a letter (v1.2.3.4, IPV4's look-behind), with more
# than four parts (1.2.3.4.5), or after the word "version" (version 10.0.0.1, Version: 1.2.3.4).
VERSION_BEFORE = re.compile(r"\bversion\s*:?\s*$", re.IGNORECASE)
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")


@dataclass(frozen=True)
class Finding:
    """One piece of personal data: its kind (one of KINDS) and where it is in the text."""

    kind: str
    start: int
    end: int
    text: str
    canonical: str = field(default="", compare=False, repr=False)  # the value written one way, where known

    @property
    def value(self) -> str:
        """The value written one way, so two spellings of one number or address get one placeholder."""
        if self.canonical:
            return self.canonical
        if self.kind == "email":
            return self.text.lower()
        if self.kind in ("card", "iban"):
            return re.sub(r"[ -]", "", self.text).upper()
        if self.kind == "ip":
            return str(ipaddress.ip_address(self.text))
        return re.sub(r"\D", "", self.text)  # phone: its digits (the caller's format may vary)


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum every payment card number passes."""
    total = 0
    for i, char in enumerate(reversed(digits)):
        n = int(char) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616's mod-97 check (the four first characters moved to the end, letters as 10..35)."""
    if not 15 <= len(iban) <= 34:
        return False
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(char, 36)) for char in moved)) % 97 == 1


def _emails(text: str) -> Iterable[Finding]:
    for match in EMAIL.finditer(text):
        yield Finding("email", match.start(), match.end(), match.group())


def _cards(text: str) -> Iterable[Finding]:
    for match in CARD.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        if luhn_ok(digits) and len(set(digits)) > 1:  # 0000 0000 0000 0000 passes Luhn but is a placeholder
            yield Finding("card", match.start(), match.end(), match.group())


def _ibans(text: str) -> Iterable[Finding]:
    for match in IBAN.finditer(text):
        candidate = match.group()
        # The last group may be a word that follows the IBAN ("... 0130 00 THEN"): shorten until it checks.
        while candidate:
            if iban_ok(candidate.replace(" ", "")):
                yield Finding("iban", match.start(), match.start() + len(candidate), candidate)
                break
            candidate = candidate[: max(candidate.rfind(" "), 0)]


def _ips(text: str) -> Iterable[Finding]:
    for match in IPV4.finditer(text):
        if VERSION_BEFORE.search(text, max(0, match.start() - 10), match.start()):
            continue
        try:
            ipaddress.IPv4Address(match.group())  # each part at most 255, no leading zeros
        except ValueError:
            continue
        yield Finding("ip", match.start(), match.end(), match.group())
    for match in IPV6.finditer(text):
        groups = [g for g in re.split(r"[:.]", match.group()) if g]
        if len(groups) < 3:  # "::1", "a::b", a time like 12:30 is no address of a person
            continue
        try:
            ipaddress.IPv6Address(match.group())
        except ValueError:
            continue
        yield Finding("ip", match.start(), match.end(), match.group())


class RegionError(ValueError):
    """A phone region phonenumbers does not know."""


def check_region(region: str) -> str:
    """`region` when phonenumbers knows it, else RegionError naming the fix."""
    if region not in phonenumbers.SUPPORTED_REGIONS:
        raise RegionError(f"--phone-region {region!r}: not a country phonenumbers knows; give an ISO 3166 code "
                          "in capitals such as US, GB or DE")
    return region


def _phones(text: str, region: str) -> Iterable[Finding]:
    if sum(char.isdigit() for char in text) < 7:  # no valid number is shorter; skips most text quickly
        return
    for match in phonenumbers.PhoneNumberMatcher(text, region):
        e164 = phonenumbers.format_number(match.number, phonenumbers.PhoneNumberFormat.E164)
        yield Finding("phone", match.start, match.end, match.raw_string, e164)


def find(text: str, region: str = DEFAULT_REGION) -> list[Finding]:
    """Every piece of personal data in `text`, in order; where two overlap, the kind first in KINDS wins."""
    found = [*_emails(text), *_ibans(text), *_cards(text), *_ips(text), *_phones(text, region)]
    kept: list[Finding] = []
    for finding in sorted(found, key=lambda f: (KINDS.index(f.kind), f.start)):
        if all(finding.end <= other.start or other.end <= finding.start for other in kept):
            kept.append(finding)
    return sorted(kept, key=lambda f: f.start)


@dataclass
class Placeholders:
    """The placeholders of one conversation: one per distinct value, numbered per kind; replacements counted."""

    by_value: dict[tuple[str, str], str] = field(default_factory=dict)
    counts: collections.Counter = field(default_factory=collections.Counter)  # replacements per kind

    def of(self, finding: Finding) -> str:
        """The placeholder for `finding`'s value, the same one each time that value comes back."""
        key = (finding.kind, finding.value)
        if key not in self.by_value:
            number = sum(kind == finding.kind for kind, _ in self.by_value) + 1
            self.by_value[key] = f"[{LABELS[finding.kind]}_{number}]"
        self.counts[finding.kind] += 1
        return self.by_value[key]


def redact(text: str, mapping: Placeholders | None = None, region: str = DEFAULT_REGION) -> str:
    """`text` with each piece of personal data replaced by its placeholder in `mapping` (one per conversation)."""
    mapping = Placeholders() if mapping is None else mapping
    out, last = [], 0
    for finding in find(text, region):
        out += [text[last : finding.start], mapping.of(finding)]
        last = finding.end
    return "".join(out) + text[last:]


def redact_conversation(
    messages: list[dict[str, str]], mapping: Placeholders | None = None, region: str = DEFAULT_REGION
) -> list[dict[str, str]]:
    """A copy of the chat messages with personal data replaced, one value one placeholder across all of them
    (pass `mapping` to read the counts)."""
    mapping = Placeholders() if mapping is None else mapping
    return [{**message, "content": redact(message["content"], mapping, region)} for message in messages]


def redact_rows(rows: list, region: str = DEFAULT_REGION) -> tuple[list, collections.Counter]:
    """Rows (dataclasses with .messages, like train.records.Example) each redacted as one conversation, and the
    replacements per kind."""
    counts: collections.Counter = collections.Counter()
    redacted = []
    for row in rows:
        mapping = Placeholders()
        redacted.append(replace(row, messages=redact_conversation(row.messages, mapping, region)))
        counts.update(mapping.counts)
    return redacted, counts


def describe(counts: dict[str, int]) -> str:
    """Counts per kind in words: "1 e-mail address, 2 card numbers"."""
    return ", ".join(f"{n} {NAMES[kind][n != 1]}" for kind in NAMES if (n := counts.get(kind, 0)))
