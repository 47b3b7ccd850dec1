"""Experiment helpers: tiny models for tests and demos, the real SmolLM2 loader, offline datasets."""
