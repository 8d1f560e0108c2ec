"""What runs next for a pipeline on a cluster: observed state in, a plan out (pure, no I/O).

- :mod:`.status` -- the ProLongPipeline's ``status`` as pydantic models (the CRD's status schema
  is generated from them);
- :mod:`.observe` -- a RayJob as the planner sees it (:class:`~.observe.ObservedRayJob`) and how
  its two KubeRay statuses classify;
- :mod:`.planner` -- :func:`~.planner.plan_pipeline`: which RayJobs to create and delete and
  which status to write.

It imports only :mod:`prolong.stage` and :mod:`prolong.spec`. The operator (``operator/handlers.py``)
and ``prolongctl submit/status`` call it; the Kubernetes API calls stay with them.
"""
