"""Compose a config outside the CLI (tests, notebooks, the trainer's checks).

The CLI composes through ``hydra.main`` (for multirun and ``--cfg``); this uses
Hydra's compose API over the same search path, so both see the same configs.
"""

from __future__ import annotations

from hydra import compose as hydra_compose
from hydra import initialize
from omegaconf import DictConfig

from launch.config import Config, to_config
from launch.config.source import register


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    register()
    with initialize(version_base="1.3", config_path=None):
        return hydra_compose(config_name="config", overrides=list(overrides))


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The typed config for ``overrides``, as ``trainctl plan`` would compose it."""
    return to_config(compose(overrides))
