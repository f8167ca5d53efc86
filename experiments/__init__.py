"""Experiment launchers, the results report and benchmarks (scripts; not part of the package)."""
