"""Config: the typed schema, the derived numbers and the validation rules."""

from launch.config.derive import Derived, derive
from launch.config.schema import Config

__all__ = ["Config", "Derived", "derive", "to_config"]


def to_config(cfg) -> Config:
    """The composed DictConfig as schema dataclasses (interpolations resolved)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(cfg)
