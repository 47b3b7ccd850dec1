"""The evidence harness (not shipped in the wheel): the SmolLM2 loader, stdlib datasets, the demo and the studies.

Run from a checkout of the repository, e.g. ``python -m experiments.demo`` or ``python benchmarks/evidence.py``.
"""
