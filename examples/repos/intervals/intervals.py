"""Closed integer intervals."""


def merge(intervals):
    """Merge overlapping closed intervals; returns a sorted list of (start, end)."""
    result = []
    for start, end in sorted(intervals):
        if result and start < result[-1][1]:
            result[-1] = (result[-1][0], max(result[-1][1], end))
        else:
            result.append((start, end))
    return result


def total_length(intervals):
    """Total length covered by the intervals."""
    return sum(end - start for start, end in merge(intervals))
