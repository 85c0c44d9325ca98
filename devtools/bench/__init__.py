"""Benchmark harness (`python -m bench`); not part of the test suite."""
