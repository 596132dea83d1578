"""From a composed config to a plan: typed, derived, validated, estimated.

This is the one-way pipeline's front half, shared by every verb up to submit.
It raises ``UserError`` with every problem at once and never writes anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launch.config import Config, Derived, derive, to_config
from launch.config.hydra_errors import explain, unknown_key
from launch.config.validate import validate
from launch.errors import UserError
from launch.estimate import estimate


@dataclass(frozen=True)
class Plan:
    cfg: Config
    derived: Derived
    numbers: dict
    """The plan.json content."""

    def config_yaml(self) -> str:
        """The fully resolved config, enums written as the names a user types."""
        return OmegaConf.to_yaml(OmegaConf.structured(self.cfg))


def make_plan(composed: DictConfig) -> Plan:
    try:
        cfg = to_config(composed)
    except OmegaConfBaseException as exc:
        raise UserError(explain(exc) or str(exc)) from None
    extra = _keys(composed) - _keys(OmegaConf.structured(cfg))
    if extra:  # '+parallel.foo=1' forces a key the schema does not have
        raise UserError([unknown_key(key) for key in sorted(extra)])
    d = derive(cfg)
    problems = validate(cfg, d)
    if problems:
        raise UserError([str(p) for p in problems])
    return Plan(cfg, d, plan_numbers(cfg, d))


def _keys(node: DictConfig, prefix: str = "") -> set[str]:
    """Every dotted key path in a config (values that are mappings are walked)."""
    keys = set()
    for key in node.keys():
        path = f"{prefix}{key}"
        keys.add(path)
        value = node._get_node(key)
        if isinstance(value, DictConfig) and not value._is_none() and not value._is_missing():
            keys |= _keys(value, path + ".")
    return keys


def plan_numbers(cfg: Config, d: Derived) -> dict:
    """The plan.json keys of DESIGN.md: layout from ``derive``, the rest from the estimator."""
    p = cfg.parallel
    return {
        "world_size": d.world_size,
        "nodes": cfg.cluster.nodes,
        "gpus_per_node": cfg.cluster.gpus_per_node,
        "parallel": {
            "tp": p.tp, "pp": p.pp, "cp": p.cp, "ep": p.ep, "vpp": p.vpp, "dp": d.dp,
            "micro_batch_size": p.micro_batch_size, "grad_accum_steps": d.grad_accum_steps,
            "global_batch_size": cfg.train.global_batch_size,
        },
        **estimate(cfg, d),
    }
