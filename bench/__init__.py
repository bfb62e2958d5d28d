"""SSN Lab benchmarks: every performance goal as a ratio measured side by side. Run ``python -m bench``."""
