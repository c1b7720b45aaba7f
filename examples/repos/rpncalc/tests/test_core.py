from rpncalc import evaluate


def test_addition():
    assert evaluate("1 2 +") == 3


def test_product_of_sums():
    assert evaluate("1 2 + 3 4 + *") == 21


def test_underflow():
    try:
        evaluate("1 +")
    except ValueError:
        return
    raise AssertionError("ValueError expected")
