import unittest

from intervals import merge, total_length


class TestMerge(unittest.TestCase):
    def test_overlapping(self):
        self.assertEqual(merge([(1, 4), (2, 6)]), [(1, 6)])

    def test_disjoint_sorted(self):
        self.assertEqual(merge([(5, 6), (1, 2)]), [(1, 2), (5, 6)])

    def test_empty(self):
        self.assertEqual(merge([]), [])


class TestTotal(unittest.TestCase):
    def test_total_of_overlapping(self):
        self.assertEqual(total_length([(0, 2), (1, 3)]), 3)
