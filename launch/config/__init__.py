"""Config: the typed schema, the derived numbers and the validation rules."""

from omegaconf import OmegaConf

from launch.config.derive import Derived, derive
from launch.config.schema import Config

__all__ = ["Config", "Derived", "derive", "to_config"]


def to_config(composed) -> Config:
    """The composed config (already typed: it extends the schema) as dataclasses."""
    return OmegaConf.to_object(composed)
