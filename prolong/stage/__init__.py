"""The stage contract, one definition of each name.

A *stage* is one run of one job spec (PretrainJob, SFTJob or EvalJob), alone or inside a
ProLongPipeline. Everything that says which run a stage is, what it is called, where it writes and
when it is done lives here:

- :mod:`.identity` -- :class:`~.identity.StageRef`, :func:`~.identity.stage_id` (a hash of the
  spec, the upstream ids and ``rerun``), the scheduling-only fields, pipeline / standalone stages;
- :mod:`.names` -- job, RayJob, ConfigMap and retry names, the DNS-1035 rule, our labels;
- :mod:`.uri` -- local path or object-store URI (pure string rules);
- :mod:`.directory` -- ``<storageRoot>/<pipeline>/<stage>-<id>/`` on local paths and object
  stores: :class:`~.directory.StageDir`, the typed :class:`~.directory.Manifest`, ``metrics.jsonl``
  and the ``COMPLETE`` marker;
- :mod:`.logs` -- worker output into ``<stage dir>/logs/``;
- :mod:`.lock` -- one run of a stage at a time (``<stage dir>/.lock``);
- :mod:`.payload` -- what travels with a stage: ``stage.json`` beside ``job.yaml`` and the
  :class:`~.payload.StageRun` each training worker receives.

This package imports only :mod:`prolong.spec` (and pyarrow for storage). The modules are imported
by name (``from prolong.stage.identity import StageRef``); this file re-exports nothing, so that
``prolong.spec`` can take its name rules from :mod:`.names` without importing the rest.
"""
