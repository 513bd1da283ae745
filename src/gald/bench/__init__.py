"""Benchmarks behind ``python -m gald.bench`` (timing helpers and the per-topic tables)."""
