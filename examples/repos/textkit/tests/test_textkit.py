from textkit import slugify, truncate


def test_slugify_lowercases():
    assert slugify("Hello") == "hello"


def test_truncate_short_text_unchanged():
    assert truncate("abc", 5) == "abc"


def test_truncate_marks_cut():
    assert truncate("abcdefgh", 6) == "abc..."
