"""Research tooling beside the product: a top-level package of the repository, not installed with softprompt.

It uses softprompt's public API only and writes under ``runs/`` and ``research/results/``, never into
``docs/`` or ``examples/`` (``research.paths``).

* ``python -m research.run``: softprompt against PEFT, side by side in one run (``docs/benchmarks.md``);
  ``research.profile``, ``research.attention``, ``research.decode_step``, ``research.gemv`` and ``research.soak``
  time one path each.
* ``python -m research.quality`` / ``research.sweep`` / ``research.cross_model``: quality on the reference
  tasks, learning-rate x length grids as one multi-adapter job, ensembles across base models.
* ``python -m research.reproduce``: every measured number of ``docs/results.md`` and ``research/NOTES.md``.
* ``python -m research.export RESULT --into examples/adapters``: the one explicit step that ships an adapter.
"""
