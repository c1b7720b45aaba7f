from money import Money


def test_add_same_currency():
    assert Money(150, "EUR") + Money(75, "EUR") == Money(225, "EUR")


def test_add_mismatch_raises():
    try:
        Money(1, "EUR") + Money(1, "USD")
    except ValueError:
        return
    raise AssertionError("ValueError expected")


def test_split_even():
    assert Money(90, "EUR").split(3) == [Money(30, "EUR")] * 3


def test_str():
    assert str(Money(1205, "EUR")) == "12.05 EUR"
