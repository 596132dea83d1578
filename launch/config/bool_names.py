"""Enum choices named ``true`` and ``false`` (``parallel.sequence_parallel``: auto | true | false).

Hydra's override grammar and YAML both read an unquoted ``true``/``false`` as a
bool, and OmegaConf refuses a bool for an Enum field (2.3:
``EnumNode.validate_and_convert_to_enum``), though it takes the member's name as
a string. So before anything composes, trainctl quotes these words where a key
in ``KEYS`` is set:

- on the command line and in a pipeline stage's overrides:
  ``parallel.sequence_parallel=true`` becomes ``parallel.sequence_parallel='true'``
  (sweeps too: ``=true,false``), by ``quote_overrides``;
- in a ``config.yaml`` written when the field was untyped (``sequence_parallel:
  true``), by ``quote_loaded``, so an older run directory still reads; and in
  the config a checkpoint recorded then, by ``as_name``, so it still resumes.

A YAML option file of one's own must quote them (``sequence_parallel: 'true'``);
a bool there fails while composing with a message that says so
(``launch/config/hydra_errors.py``). The resolved ``config.yaml`` keeps the
name: OmegaConf writes the member ``true`` as ``'true'``.
"""

from __future__ import annotations

import re

from omegaconf import DictConfig, OmegaConf

KEYS = ("parallel.sequence_parallel",)
"""Every schema key whose Enum has members named true/false (tests/test_compose.py checks the list)."""

_OVERRIDE = re.compile(r"^(?P<prefix>\+{0,2})(?P<key>[\w.]+)=(?P<value>.*)$", re.DOTALL)
_BARE_BOOL = re.compile(r"(?<![\w'\"])(true|false)(?![\w'\"])", re.IGNORECASE)


def quote_overrides(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """``overrides`` with every bare true/false of a ``KEYS`` value quoted; the rest as given."""
    return [_quote_override(o) for o in overrides]


def _quote_override(override: str) -> str:
    match = _OVERRIDE.match(override)
    if not match or match["key"] not in KEYS:
        return override
    value = _BARE_BOOL.sub(lambda m: f"'{m[1].lower()}'", match["value"])
    return f"{match['prefix']}{match['key']}={value}"


def as_name(key: str, value: object) -> object:
    """The member name for a bool at a ``KEYS`` key (``True`` -> ``'true'``); any other value as it is."""
    return str(value).lower() if key in KEYS and isinstance(value, bool) else value


def quote_loaded(node: DictConfig) -> DictConfig:
    """A loaded config with a bool at a ``KEYS`` key replaced by its name (``True`` -> ``'true'``)."""
    for key in KEYS:
        value = OmegaConf.select(node, key, default=None)
        if isinstance(value, bool):
            OmegaConf.update(node, key, str(value).lower(), merge=False)
    return node
