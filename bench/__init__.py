"""Benchmarks of protoseg_ext: ``python bench/run.py --help``."""
