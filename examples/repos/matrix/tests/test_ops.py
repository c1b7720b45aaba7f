from matrix import identity, multiply, transpose


def test_transpose_square():
    assert transpose([[1, 2], [3, 4]]) == [[1, 3], [2, 4]]


def test_identity_product():
    m = [[1, 2], [3, 4]]
    assert multiply(m, identity(2)) == m


def test_shape_mismatch():
    try:
        multiply([[1, 2]], [[1, 2]])
    except ValueError:
        return
    raise AssertionError("ValueError expected")
