"""Small text helpers."""

import re

__all__ = ["slugify", "truncate"]


def slugify(text: str) -> str:
    """Lower-case `text` and join its words with single dashes."""
    text = text.lower()
    return re.sub(r"[^a-z0-9]", "-", text)


def truncate(text: str, width: int, ellipsis: str = "...") -> str:
    """Cut `text` to at most `width` characters, marking the cut with `ellipsis`."""
    if len(text) <= width:
        return text
    return text[: max(0, width - len(ellipsis))] + ellipsis
