"""The run layer: what ``prolongctl run`` does above the stages it runs.

- :mod:`.ship` -- copy a finished stage's model (final/, manifest, curves) into a directory of the
  repository: how the quickstart's pretrained base (``jobs/quickstart/base/``) is published.

It drives :mod:`prolong.train` and :mod:`prolong.eval`; neither imports it (tests/test_layout.py).
"""
