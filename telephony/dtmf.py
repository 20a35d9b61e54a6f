"""The keys a caller can press, as every wire names them.

RFC 4733 numbers its telephone events 0-15 in this order (0-9, *, #, A-D), AudioSocket sends
the key's character, Twilio and the carriers its text: one set for all of them.
"""

from __future__ import annotations

from typing import Final

DTMF_KEYS: Final = "0123456789*#ABCD"  # RFC 4733 event n is DTMF_KEYS[n]
DTMF_DIGITS: Final = frozenset(DTMF_KEYS)
