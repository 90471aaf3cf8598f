"""Resource ids: a prefix plus a time-ordered, URL-safe string (48-bit milliseconds + 80 random bits, Crockford
base32), so that ordering by id is ordering by creation time, which the list cursors rely on."""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def new_id(prefix: str) -> str:
    value = (int(time.time() * 1000) << 80) | secrets.randbits(80)
    chars = []
    for _ in range(26):
        value, index = divmod(value, 32)
        chars.append(_ALPHABET[index])
    return f"{prefix}_{''.join(reversed(chars))}"
