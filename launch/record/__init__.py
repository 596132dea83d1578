"""The run directory's records: ``read`` (typed ``config.yaml`` and ``plan.json``, versions, damage)
and ``write`` (every file staged and renamed into place, ``plan.json`` last; ``meta.json``)."""
