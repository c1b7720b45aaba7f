"""Lists-of-lists matrix operations."""


def identity(n: int) -> list:
    return [[1 if i == j else 0 for j in range(n)] for i in range(n)]


def transpose(m: list) -> list:
    """Rows become columns."""
    n = len(m)
    return [[m[i][j] for i in range(n)] for j in range(n)]


def multiply(a: list, b: list) -> list:
    """The matrix product a × b."""
    if a and len(a[0]) != len(b):
        raise ValueError("shapes do not match")
    cols = transpose(b)
    return [[sum(x * y for x, y in zip(row, col)) for col in cols] for row in a]
