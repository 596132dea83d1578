"""The run directory's records, and nothing else reads or writes them: ``read`` (typed ``config.yaml``
and ``plan.json``, versions, damage), ``write`` (every file staged and renamed into place, ``plan.json``
last; ``meta.json``) and ``jobs`` (``job.json``, ``sweep.json``, ``pipeline.json``: what was submitted)."""
