"""Passwords out of URLs before they reach a message, a log line or a config a dashboard shows."""

from __future__ import annotations

import re

# `scheme://user:PASSWORD@host`: the password runs to the last `@` before the path, so one with
# an unescaped `@` in it is hidden whole. An empty password (`user:@`) has nothing to hide.
_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'\"]*:)[^\s'\"/]+@")
# libpq also takes the password as a query parameter (`?password=...`) or a keyword (`password=...`).
_PARAMETER = re.compile(r"(\bpassword=)[^&\s'\"]+", re.IGNORECASE)
MASK = "***"


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced by `***`: a bare URL, or a message,
    repr or exception text that quotes one."""
    return _PARAMETER.sub(rf"\g<1>{MASK}", _USERINFO.sub(rf"\g<1>{MASK}@", text))


def has_password(url: str) -> bool:
    """Whether `url` carries a password that `redact` would hide."""
    return redact(url) != url
