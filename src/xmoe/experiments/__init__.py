"""Experiments built on training runs: router comparisons and threshold sweeps."""
