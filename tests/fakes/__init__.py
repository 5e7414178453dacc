"""Fake remote services on 127.0.0.1 for the tests and benchmarks."""
