"""Redaction of recorded text: each secret format becomes its typed placeholder; look-alikes stay."""

import os
import stat

import pytest

from llamaduo.capture import CaptureWriter
from llamaduo.redact import iban_ok, looks_like_secret, luhn_ok, make_redactor, redact

CASES = [
    ("key sk-proj-AbCdEfGhIjKlMnOpQrStUv123456 here", "api_key"),
    ("anthropic sk-ant-api03-abcdefghijklmnopqrstuvwx", "api_key"),
    ("aws AKIAIOSFODNN7EXAMPLE done", "aws_key"),
    ("gh ghp_abcdefghijklmnopqrstuvwxyz0123456789 x", "vcs_token"),
    ("pat github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyzABCDEFGHIJ", "vcs_token"),
    ("slack xoxb-1234567890-abcdefghij", "chat_token"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig", "bearer"),
    ("card 4111 1111 1111 1111 exp 12/29", "card"),
    ("card 5500-0000-0000-0004", "card"),
    ("pay to DE89 3704 0044 0532 0130 00 today", "iban"),
    ("pay to GB82WEST12345698765432 today", "iban"),
    ("mail bob@example.com", "email"),
    ("call +44 20 7946 0958", "phone"),
]


@pytest.mark.parametrize("text,kind", CASES, ids=[k + str(i) for i, (_, k) in enumerate(CASES)])
def test_each_format_becomes_its_typed_placeholder(text, kind):
    out = redact(text)
    assert f"[REDACTED:{kind}]" in out, out
    secret = text.split(" ", 1)[1].split(" today")[0]
    assert secret not in out


def test_password_pairs_keep_their_name_but_not_their_value():
    out = redact("login with password=hunter2hunter and pwd: 'letmein42'")
    assert out == "login with password=[REDACTED:password] and pwd: [REDACTED:password]"


def test_numbers_that_fail_their_checksum_are_kept():
    assert not luhn_ok("4111111111111112")
    assert redact("order 4111 1111 1111 1112 shipped") == "order 4111 1111 1111 1112 shipped"
    assert not iban_ok("DE89370400440532013001")
    assert redact("ref DE89370400440532013001") == "ref DE89370400440532013001"
    # Task content the checks must not eat: dates, prices, quantities, order numbers.
    kept = "On 2024-05-01 order #12345678 costs $19.99 for 3 mugs"
    assert redact(kept) == kept


def test_redaction_kinds_are_configurable():
    only_cards = make_redactor(["card"])
    assert only_cards("bob@example.com 4111111111111111") == "bob@example.com [REDACTED:card]"
    with pytest.raises(ValueError, match="unknown redaction kind"):
        make_redactor(["ssn"])


def test_key_looking_values_are_recognised_and_variable_names_are_not():
    for v in ("sk-abc123", "AKIAIOSFODNN7EXAMPLE", "ghp_x", "a8f3k2l9q0w7e6r5t4y3u2i1o0"):
        assert looks_like_secret(v)
    for v in ("OPENAI_API_KEY", "MY_SERVICE_KEY_2", "ANTHROPIC_API_KEY"):
        assert not looks_like_secret(v)


def test_capture_file_follows_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        w = CaptureWriter(tmp_path / "cap.jsonl")
        w.append({"messages": []})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "cap.jsonl").stat().st_mode) == 0o600
