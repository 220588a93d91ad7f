"""Benchmarks (scripts, not tests): ``python -m benchmarks`` or ``make bench``."""
