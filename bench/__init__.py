"""Benchmarks: `./dev bench NAME [options]` (or `python -m bench NAME`). Results go in docs/benchmarks.md."""
