"""What the two readers of training data share: the missing-data errors, the tokenizer's EOD id, the datasets pair.

``data`` reads pretraining shards and ``chat`` reads conversations; ``data``
picks between them, so both import from here and not from each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from launch.data.tokenizer import inspect

PREPARE_HINT = "run `trainctl prepare ...` first (with the same data.* overrides as this run)"


class MissingData(Exception):
    """What this run reads is not there."""


class MissingShards(MissingData):
    """The prepared shards of a mixture source are not there."""


def eod_id(tokenizer_path: str) -> tuple[int, int]:
    """(vocabulary size, end-of-document id) of data.tokenizer, as `trainctl prepare` found them."""
    info = inspect(Path(tokenizer_path))  # the same rule prepare used
    return info.vocab_size, info.eod_id


@dataclass
class Datasets:
    train: object
    valid: object | None
