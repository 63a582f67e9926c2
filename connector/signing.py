"""Coherent's webhook signature: lowercase hex HMAC-SHA256 of the exact raw body.

Pure functions over bytes, with no framework and no I/O, in the manner of gidgethub's
``validate_event``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable

from connector.errors import SignatureInvalid

SIGNATURE_HEADER = "x-protocol-signature"

# A SHA-256 digest is 32 bytes, 64 hex digits. Checking the shape first means nothing of an
# arbitrary length or alphabet ever reaches the comparison.
_SIGNATURE_SHAPE = re.compile(r"[0-9a-f]{64}")


def sign(body: bytes, secret: str) -> str:
    """Return the signature Coherent would send for ``body``."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, signature: str | None, secrets: Iterable[str]) -> None:
    """Raise :class:`SignatureInvalid` unless ``signature`` signs ``body`` under one of ``secrets``.

    Several secrets are accepted so that a secret can be rotated with no downtime. Every secret is
    tried, so the time taken does not reveal which one matched.
    """
    if not signature:
        raise SignatureInvalid(f"the {SIGNATURE_HEADER} header is missing", reason="missing_signature")
    if _SIGNATURE_SHAPE.fullmatch(signature) is None:
        raise SignatureInvalid(
            f"the {SIGNATURE_HEADER} header is not a lowercase hex HMAC-SHA256 (64 characters)",
            reason="malformed_signature",
        )
    given = signature.encode("ascii")
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(sign(body, secret).encode("ascii"), given)
    if not matched:
        raise SignatureInvalid(
            f"the {SIGNATURE_HEADER} header does not match the body under any configured secret",
            reason="bad_signature",
        )
