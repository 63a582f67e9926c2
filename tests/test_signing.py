import hashlib
import hmac

import pytest

from connector.errors import SignatureInvalid
from connector.signing import sign, verify_signature

BODY = b'{"id":"a056V7R7NmNRjl70","type":"contact.created","payload":{"id":"x"}}'


def test_sign_is_lowercase_hex_hmac_sha256_of_the_exact_body():
    expected = hmac.new(b"secret", BODY, hashlib.sha256).hexdigest()
    assert sign(BODY, "secret") == expected
    assert expected == expected.lower() and len(expected) == 64


def test_a_correct_signature_verifies():
    verify_signature(BODY, sign(BODY, "secret"), ["secret"])


def test_any_configured_secret_verifies_so_secrets_can_rotate():
    verify_signature(BODY, sign(BODY, "new"), ["old", "new"])
    verify_signature(BODY, sign(BODY, "old"), ["old", "new"])


@pytest.mark.parametrize(
    ("signature", "reason"),
    [
        (None, "missing_signature"),
        ("", "missing_signature"),
        ("abc", "malformed_signature"),
        ("A" * 64, "malformed_signature"),
        ("é" * 64, "malformed_signature"),
        ("0" * 10_000, "malformed_signature"),
        ("0" * 64, "bad_signature"),
    ],
)
def test_bad_signatures_are_refused_with_a_reason(signature, reason):
    with pytest.raises(SignatureInvalid) as info:
        verify_signature(BODY, signature, ["secret"])
    assert info.value.reason == reason


def test_a_signature_under_another_secret_is_refused():
    with pytest.raises(SignatureInvalid):
        verify_signature(BODY, sign(BODY, "other"), ["secret"])


def test_a_body_changed_by_one_byte_is_refused():
    signature = sign(BODY, "secret")
    tampered = BODY.replace(b'"x"', b'"y"')
    with pytest.raises(SignatureInvalid):
        verify_signature(tampered, signature, ["secret"])


def test_two_signatures_joined_by_the_server_are_refused():
    signature = sign(BODY, "secret")
    with pytest.raises(SignatureInvalid):
        verify_signature(BODY, f"{signature},{signature}", ["secret"])
