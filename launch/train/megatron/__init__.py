"""The Megatron-Core engine, split by job: ``build`` (parallel state, model, optimizer), ``state``
(distributed checkpoints), ``module`` (``MegatronModule``: the step, behind ``launch.train.module``),
``hf`` (weights to and from Hugging Face's Llama/Mixtral) and ``export`` (its command line)."""
