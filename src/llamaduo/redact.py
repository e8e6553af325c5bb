"""Secrets and personal data out of recorded text: typed placeholders, checksums before masking.

Used by `capture` (and any other place that stores text it did not write, such as shadow
traffic). Each finder replaces a match with `[REDACTED:<kind>]`; card numbers must pass the
Luhn check and IBANs the mod-97 check, so an order number or a date is left alone.
`looks_like_secret` is the test the config uses to refuse a key pasted where a name belongs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

EMAIL_RE = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"
# Phone numbers: international (+CC ...), an area code in parentheses, or 3-3-4 groups. Dates,
# prices and bare order numbers do not match, so redaction does not eat task content.
PHONE_RE = (
    r"(?<![\w+])(?:\+\d{1,3}[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?\d{1,4}(?:[\s.-]?\d{2,4}){1,4}"
    r"|\(\d{2,4}\)[\s.-]?\d{3,4}[\s.-]?\d{3,4}|\d{3}[\s.-]\d{3}[\s.-]\d{4})(?!\w)"
)
_B = r"(?<![A-Za-z0-9_-])"  # a token starts at a word boundary that also excludes '-' and '_'
API_KEY_RE = _B + r"sk-(?:ant-|proj-|svcacct-)?[A-Za-z0-9_-]{16,}"
AWS_KEY_RE = _B + r"(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])"
GITHUB_TOKEN_RE = _B + r"(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{40,})"
SLACK_TOKEN_RE = _B + r"xox[bpars]-[A-Za-z0-9-]{10,}"
BEARER_RE = r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{12,}"
PASSWORD_RE = (
    r"(?i)\b(?P<key>pass(?:word|wd)?|pwd|secret|api[_-]?key|access[_-]?token|token)"
    r"(?P<sep>\s*[:=]\s*)(?P<q>[\"']?)(?!\[REDACTED)(?P<val>[^\s\"',;&]+)(?P=q)"
)
CARD_RE = r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)"
IBAN_RE = r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,3})?\b"


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum card numbers carry (a random 16-digit number fails it 9 times in 10)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    """ISO 13616 mod-97 check of an IBAN (spaces ignored)."""
    s = text.replace(" ", "").upper()
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


@dataclass(frozen=True)
class Finder:
    """One kind of sensitive text: its pattern, an optional check of a match, its placeholder kind."""

    kind: str
    pattern: str
    check: Callable[[re.Match[str]], bool] | None = None

    def compiled(self) -> re.Pattern[str]:
        return re.compile(self.pattern)


def _card(m: re.Match[str]) -> bool:
    digits = re.sub(r"\D", "", m.group(0))
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


FINDERS: dict[str, Finder] = {
    # Most specific first: a key inside "password=sk-..." is named as an API key.
    "api_key": Finder("api_key", API_KEY_RE),
    "aws_key": Finder("aws_key", AWS_KEY_RE),
    "vcs_token": Finder("vcs_token", GITHUB_TOKEN_RE),
    "chat_token": Finder("chat_token", SLACK_TOKEN_RE),
    "bearer": Finder("bearer", BEARER_RE),
    "password": Finder("password", PASSWORD_RE),
    "iban": Finder("iban", IBAN_RE, lambda m: iban_ok(m.group(0))),
    "card": Finder("card", CARD_RE, _card),
    "email": Finder("email", EMAIL_RE),
    "phone": Finder("phone", PHONE_RE),
}
DEFAULT_KINDS: tuple[str, ...] = tuple(FINDERS)


def placeholder(kind: str) -> str:
    return f"[REDACTED:{kind}]"


def make_redactor(kinds: Iterable[str] = DEFAULT_KINDS, extra_patterns: Iterable[str] = ()) -> Callable[[str], str]:
    """A function masking every kind in `kinds` (names of `FINDERS`) and every regex in `extra_patterns`."""
    unknown = sorted(set(kinds) - set(FINDERS))
    if unknown:
        raise ValueError(f"unknown redaction kind(s) {unknown}; known: {sorted(FINDERS)}")
    steps = [(FINDERS[k], FINDERS[k].compiled()) for k in kinds]
    extra = [re.compile(p) for p in extra_patterns]

    def redact(text: str) -> str:
        for finder, rx in steps:
            def sub(m: re.Match[str], f: Finder = finder) -> str:
                if f.check is not None and not f.check(m):
                    return m.group(0)
                if f.kind == "password":  # keep the key name: the pair's shape is task content
                    return f"{m.group('key')}{m.group('sep')}{placeholder('password')}"
                return placeholder(f.kind)

            text = rx.sub(sub, text)
        for rx in extra:
            text = rx.sub(placeholder("custom"), text)
        return text

    return redact


redact = make_redactor()
"""Everything in `FINDERS` masked."""

_SECRET_PREFIXES = re.compile(r"^(?:sk-|AKIA|ASIA|gh[pousr]_|github_pat_|xox[bpars]-|Bearer\s)")


def looks_like_secret(value: str) -> bool:
    """A key or token rather than the name of a variable holding one: a known prefix, or a long
    run of mixed letters and digits (an environment-variable name is UPPER_SNAKE_CASE)."""
    v = value.strip()
    if _SECRET_PREFIXES.match(v):
        return True
    return len(v) >= 24 and bool(re.search(r"[a-z]", v)) and bool(re.search(r"\d", v))
