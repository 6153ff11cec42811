"""`ternary-bench` and the pytest-benchmark kernel suite."""
