"""The benchmark suite behind ``python3 benchmarks/run.py``: quality, speed, memory, report."""
