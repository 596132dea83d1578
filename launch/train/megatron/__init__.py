"""The Megatron-Core engine, split by job: ``build`` (parallel state, model, optimizer), ``state``
(distributed checkpoints) and ``module`` (``MegatronModule``: the step, behind ``launch.train.module``)."""
