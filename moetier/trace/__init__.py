"""Routing traces: record (recorder.py), the .npz format (format.py), analyze (analyze.py) and
simulate eviction policies on them (simulate.py)."""
