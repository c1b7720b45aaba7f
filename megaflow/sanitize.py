"""Text from outside (a command's output, a model's reply) made safe to store.

PostgreSQL's text columns refuse the NUL character: an agent that runs
``head -c 100 /dev/urandom`` must not make its exec hop fail to record.
"""

from __future__ import annotations

#: What a NUL character becomes: the same mark a decoding error leaves.
NUL_REPLACEMENT = "\ufffd"


def storable(text: str | None) -> str | None:
    """`text` without NUL characters (None stays None)."""
    if text and "\x00" in text:
        return text.replace("\x00", NUL_REPLACEMENT)
    return text
