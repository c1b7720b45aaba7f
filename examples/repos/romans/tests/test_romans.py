from romans import from_roman, to_roman


def test_small_numbers():
    assert [to_roman(i) for i in (1, 3, 4, 9, 14)] == ["I", "III", "IV", "IX", "XIV"]


def test_from_roman():
    assert from_roman("MCMXCIV") == 1994


def test_out_of_range():
    for bad in (0, 4000):
        try:
            to_roman(bad)
        except ValueError:
            continue
        raise AssertionError(bad)
