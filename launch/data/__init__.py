"""Data preparation: ``trainctl prepare`` tokenizes the mixture's sources into indexed shards.

``prepare`` runs where the data is (a login or data node with the ``train``
extras installed), not on the plan/render/submit path: importing this package
imports nothing heavy; ``datasets``, ``tokenizers`` and megatron-core (which
imports torch) are imported inside the functions that need them.

Modules:

- ``sources``: which files a source is, and their fingerprint (sizes, mtimes), stdlib only;
- ``tokenizer``: the tokenizer.json, its end-of-document token and the token dtype;
- ``shard``: tokenize one source with ``datasets`` and write ``{source}.bin/.idx`` + manifest;
- ``prepare``: the command: check the inputs, skip finished shards, build the rest, report epochs.
"""
