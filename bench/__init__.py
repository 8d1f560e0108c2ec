"""Benchmarks of the product's own code paths (run as scripts: ``python bench/<name>.py``).

A package only so the scripts and tests/bench can share :mod:`bench.common` and
:mod:`bench.table`; nothing here is installed with ``prolong``.
"""
