"""Benchmarks of the prediction service, each side by side with its limit.

`python -m bench` runs them all; bench/README.md says what each measures,
how, and what it found.
"""
