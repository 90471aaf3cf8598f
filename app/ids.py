"""Resource ids: a prefix plus a time-ordered, URL-safe string (48-bit milliseconds + 80 random bits, Crockford
base32), so that ordering by id is ordering by creation time, which the list cursors rely on. Within one process
ids are strictly increasing even inside one millisecond (the random part is incremented, as in monotonic ULIDs)."""

from __future__ import annotations

import secrets
import threading
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_lock = threading.Lock()
_last = 0


def new_id(prefix: str) -> str:
    global _last  # noqa: PLW0603 - the monotonic state is the point
    with _lock:
        value = (int(time.time() * 1000) << 80) | secrets.randbits(80)
        if value <= _last:
            value = _last + 1
        _last = value
    chars = []
    for _ in range(26):
        value, index = divmod(value, 32)
        chars.append(_ALPHABET[index])
    return f"{prefix}_{''.join(reversed(chars))}"
