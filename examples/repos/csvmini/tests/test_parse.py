import unittest

from csvmini import split_row


class SplitRowTest(unittest.TestCase):
    def test_plain(self):
        self.assertEqual(split_row("a,b,c"), ["a", "b", "c"])

    def test_quoted_separator(self):
        self.assertEqual(split_row('"a,b",c'), ["a,b", "c"])

    def test_empty_fields(self):
        self.assertEqual(split_row(",,"), ["", "", ""])
