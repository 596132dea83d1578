"""Estimates from the typed config: pure functions, standard library only.

``estimate(cfg, d)`` returns the plan.json blocks (DESIGN.md, "plan.json"):
model, flops, memory_gib, throughput, run, scaling, plus ``memory_stages_gib``
(each pipeline stage's per-GPU peak, first to last). One module per question:

    params   parameter counts, total and per pipeline stage
    flops    model FLOPs (Megatron-LM's formula) and 6N beside it
    memory   per-GPU memory on every stage (Korthikanti et al. 2022; ZeRO)
    perf     step time, throughput and MFU (compute, communication, pipeline bubble)
    run      wall clock, GPU-hours, cost, energy, failures, checkpoint interval, jobs
    scaling  tokens per parameter and the Chinchilla loss
"""

from __future__ import annotations

from launch.config.derive import Derived
from launch.config.schema import Config
from launch.estimate.calibration import UNCALIBRATED, Calibration
from launch.estimate.flops import flops_estimate
from launch.estimate.memory import memory_estimate
from launch.estimate.params import params_active, params_total
from launch.estimate.perf import throughput_estimate
from launch.estimate.run import run_estimate
from launch.estimate.scaling import scaling_estimate

__all__ = ["Calibration", "UNCALIBRATED", "estimate"]


def estimate(cfg: Config, d: Derived, calibration: Calibration = UNCALIBRATED) -> dict:
    """The plan.json blocks: {"model", "flops", "memory_gib", "throughput", "run",
    "scaling"} and "memory_stages_gib" (per-stage peaks, GiB, first to last).

    ``calibration``: probe runs' measured/predicted ratios (``load_calibration`` reads
    ``cluster.calibration``'s file at the verb's edge); the default is the bare model.
    """
    n_total, n_active = params_total(cfg.model), params_active(cfg.model)
    flops = flops_estimate(cfg, d, n_active)
    memory, stages_gib = memory_estimate(cfg, d, calibration)
    throughput = throughput_estimate(cfg, d, flops["per_step"], calibration)
    return {
        "model": {"params_total": n_total, "params_active": n_active},
        "flops": flops,
        "memory_gib": memory,
        "throughput": throughput,
        "run": run_estimate(cfg, d, n_total, throughput["step_time_s"]),
        "scaling": scaling_estimate(cfg, n_active, d.tokens),
        "memory_stages_gib": stages_gib,
    }
