"""Side-by-side benchmarks of cachecar as real processes on 127.0.0.1: ``python -m bench.NAME``."""
