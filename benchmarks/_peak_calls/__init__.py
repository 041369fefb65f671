"""The parts of ``benchmarks/peak_calls.py``: host simulator, naive baseline, stack, analysis.

A package (not ``benchmarks/*.py``) so that ``make bench`` and the suite, which run every
top-level script there, do not take these modules for benchmarks of their own.
"""
