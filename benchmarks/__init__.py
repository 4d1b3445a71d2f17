"""Benchmarks of fastl2r's fused operations (pytest-benchmark), dispatch counts and the ratio table.

Run with ``pytest benchmarks/ --benchmark-only``; see BENCHMARKS.md.  Not part of the
test suite (``pytest.ini`` collects ``tests/`` only) and not installed with the package.
"""
