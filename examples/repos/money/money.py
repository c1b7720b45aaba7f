"""Amounts of money in integer cents."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Money:
    cents: int
    currency: str

    def __add__(self, other: "Money") -> "Money":
        if other.currency != self.currency:
            raise ValueError(f"cannot add {other.currency} to {self.currency}")
        return Money(self.cents + other.cents, self.currency)

    def split(self, n: int) -> list:
        """Split into `n` parts that differ by at most one cent."""
        if n < 1:
            raise ValueError("n must be at least 1")
        share = self.cents // n
        return [Money(share, self.currency) for _ in range(n)]

    def __str__(self) -> str:
        return f"{self.cents // 100}.{self.cents % 100:02d} {self.currency}"
