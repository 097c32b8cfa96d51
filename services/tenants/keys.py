"""API keys: `csk_<key id>_<secret>`, of which only the SHA-256 of the secret is stored.

The secret holds 256 random bits, so a fast hash is as safe as a slow one and costs microseconds per
request. The key id is public (it finds the row); the digest is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_PREFIX = "csk"


def new_key() -> tuple[str, str, str]:
    """A fresh API key: (the key to hand out once, its public id, the digest to store)."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return f"{KEY_PREFIX}_{key_id}_{secret}", key_id, digest(secret)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_key(key: str) -> tuple[str, str] | None:
    """(key id, digest of the secret) of a well-formed key; None for anything else."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], digest(parts[2])


def same_digest(a: str, b: str) -> bool:
    """Constant-time comparison: the time taken says nothing about how much of a guess was right."""
    return hmac.compare_digest(a.encode(), b.encode())
