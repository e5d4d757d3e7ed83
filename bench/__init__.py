"""Benchmark suites for `tinyaccel bench`."""
