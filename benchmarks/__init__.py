"""Benchmarks of gradscope (run benchmarks/overhead.py)."""
