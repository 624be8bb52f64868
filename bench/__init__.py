"""Benchmarks: ``python -m bench`` (``make bench``) prints one table; see README "Performance"."""
