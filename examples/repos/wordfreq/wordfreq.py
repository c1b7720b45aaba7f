"""Word frequencies."""

import re
from collections import Counter

_WORD = re.compile(r"[A-Za-z']+")


def top_words(text: str, n: int = 10) -> list:
    """The `n` most frequent words of `text` as (word, count), most frequent first."""
    counts = Counter(_WORD.findall(text))
    return sorted(counts.items(), key=lambda item: -item[1])[:n]
