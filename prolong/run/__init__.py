"""The run layer: what ``prolongctl run`` and ``prolongctl report`` do above the stages they run.

- :mod:`.runner` -- ``prolongctl run``: stage order, locks, skips and out-of-date stages; data
  prepared, then each training stage on Ray Train (:mod:`prolong.train`) and each eval stage on
  the HELMET harness (:mod:`prolong.eval`);
- :mod:`.summary` -- one result line per finished stage and the end-of-run summary;
- :mod:`.report` -- ``prolongctl report``: a row per finished stage, training and eval alike,
  and the eval scores side by side;
- :mod:`.ship` -- copy a finished stage's model (final/, manifest, curves) into a directory of the
  repository: how the quickstart's pretrained base (``jobs/quickstart/base/``) is published.

It drives :mod:`prolong.train` and :mod:`prolong.eval`; neither imports it, and train does not
import eval (tests/test_layout.py), as :mod:`prolong.reconcile` drives the cluster from above.
"""
