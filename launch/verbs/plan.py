"""From a composed config to a plan: typed, derived, validated, estimated.

This is the one-way pipeline's front half, shared by every verb up to submit.
It raises ``UserError`` with every problem at once and never writes anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launch.config import Config, Derived, derive
from launch.config.hydra_errors import absent_keys, explain, extra_keys, unknown_key
from launch.config.validate import validate
from launch.errors import UserError
from launch.estimate import estimate
from launch.estimate.calibration import Calibration, load_calibration
from launch.executors.requeue_limit import requeue_problem
from launch.verbs.stage_fit import stage_fit_problem


@dataclass(frozen=True)
class Plan:
    cfg: Config
    derived: Derived
    numbers: dict
    """The plan.json content."""
    config_yaml: str
    """The fully resolved config (RUN_DIR/config.yaml), enums as the names a user types."""
    calibration: Calibration
    """``cluster.calibration``'s ratios, read once here; what every later estimate of this plan applies."""


def make_plan(composed: DictConfig) -> Plan:
    cfg = typed_config(composed)
    text = OmegaConf.to_yaml(composed, resolve=True)
    d = derive(cfg)
    problems = validate(cfg, d)
    if problems:
        raise UserError([str(p) for p in problems])
    calibration = load_calibration(cfg)  # the file is read here, once, never inside launch/estimate/
    numbers = plan_numbers(cfg, d, calibration)
    problem = stage_fit_problem(cfg, calibration)  # a DPO or RL stage that does not fit is refused here, with fixes
    if problem:
        raise UserError(problem)
    problem = requeue_problem(cfg, numbers["run"])  # the need comes from the estimate, so it is checked after it
    if problem:
        raise UserError(problem)
    return Plan(cfg, d, numbers, text, calibration)


def typed_config(composed: DictConfig) -> Config:
    """The composed config as dataclasses; unknown, missing and unresolvable keys as UserError."""
    extra = extra_keys(composed)
    if extra:
        raise UserError([unknown_key(key) for key in extra])
    missing = sorted(set(OmegaConf.missing_keys(composed)) | set(absent_keys(composed)))
    if missing:  # '~train' or a preset without a required key
        raise UserError([f"{key}: has no value (???)\n  fix: set it, e.g. {key}=..., or choose an option "
                         "of its group that sets it" for key in missing])
    try:
        return OmegaConf.to_object(composed)
    except OmegaConfBaseException as exc:  # an interpolation that does not resolve
        raise UserError(explain(exc) or str(exc)) from None


def plan_numbers(cfg: Config, d: Derived, calibration: Calibration) -> dict:
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
        **estimate(cfg, d, calibration),
    }
