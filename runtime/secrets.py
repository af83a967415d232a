"""Secret fingerprints: enough to tell *which* key is in use, never enough to use it."""

from __future__ import annotations

import hashlib
import hmac


def fingerprint(secret: str) -> str:
    """The first 8 hex digits of the secret's SHA-256."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()[:8]


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison, so response timing does not leak a token prefix."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))
