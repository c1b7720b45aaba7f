import durations


def test_full():
    assert durations.parse("1h30m15s") == 5415


def test_seconds_only():
    assert durations.parse("45s") == 45


def test_rejects_garbage():
    try:
        durations.parse("soon")
    except ValueError:
        return
    raise AssertionError("ValueError expected")


def test_format():
    assert durations.format_seconds(5415) == "1h30m15s" and durations.format_seconds(0) == "0s"
