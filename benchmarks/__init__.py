"""Benchmarks (not installed with the package): `llava-jp bench` runs them from a source checkout."""
