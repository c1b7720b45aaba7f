"""Imported by the tests: proves the test directory is importable, as under pytest."""
