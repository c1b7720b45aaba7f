"""Human-friendly durations: "1h30m", "45s"."""

import re

_PATTERN = re.compile(r"^(?:(?P<h>\d+)h)?(?P<m>\d+)m(?:(?P<s>\d+)s)?$|^(?P<s_only>\d+)s$")


def parse(text: str) -> int:
    """The number of seconds in `text`."""
    m = _PATTERN.match(text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    if m.group("s_only") is not None:
        return int(m.group("s_only"))
    hours, minutes, seconds = (int(m.group(k) or 0) for k in ("h", "m", "s"))
    return hours * 3600 + minutes * 60 + seconds


def format_seconds(total: int) -> str:
    """The inverse of `parse`, shortest form."""
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    out = "".join(f"{v}{u}" for v, u in ((hours, "h"), (minutes, "m"), (seconds, "s")) if v)
    return out or "0s"
