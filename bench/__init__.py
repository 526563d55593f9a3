"""Benchmarks: ``python -m bench.ingest`` (verified ingest against raw signature
checks, and the threaded verifier) and ``python -m bench.replay``."""
