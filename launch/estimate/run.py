"""What the whole run costs: wall clock, GPU-hours, dollars, energy, failures,
the checkpoint interval, and how many SLURM jobs the time limit splits it into.

Not modelled yet: time lost to failures and restarts, checkpoint stalls, queue
waits, evaluation; wall clock is steps x step time.
"""

from __future__ import annotations

import math

from launch.config.derive import Derived
from launch.config.schema import Config
from launch.config.slurm_time import parse_time_limit
from launch.estimate.memory import bytes_per_param

SECONDS_PER_DAY = 86400
CHECKPOINT_WRITE_GBPS = 100.0
"""Aggregate write bandwidth of the parallel file system to checkpoint storage, GB/s
(provisional: Lustre/GPFS scratch of a few-thousand-GPU cluster; Llama 3 reports
2-7 TB/s on Tectonic, sec. 3.3.4)."""



def checkpoint_bytes(cfg: Config, n_params: float) -> float:
    """Bytes of one checkpoint: weights and optimizer state (gradients are not saved).

    Mixed precision: 2 (bf16 weights) + 12 (fp32 master, Adam m, v) = 14 B per
    parameter; fp32: 4 + 8 = 12 B.
    """
    b = bytes_per_param(cfg)
    return n_params * (b.weights + b.optimizer)


def checkpoint_write_seconds(cfg: Config, n_params: float) -> float:
    return checkpoint_bytes(cfg, n_params) / (CHECKPOINT_WRITE_GBPS * 1e9)


def job_mtbf_hours(cfg: Config, d: Derived) -> float:
    """Mean time between interruptions of the job: one GPU's MTBF / world size."""
    return cfg.cluster.gpu.mtbf_hours / d.world_size


def young_daly_interval_seconds(write_seconds: float, mtbf_seconds: float) -> float:
    """Optimal checkpoint interval sqrt(2 * C * M) (Young 1974; Daly 2006, first order)."""
    return math.sqrt(2 * write_seconds * mtbf_seconds)


def checkpoint_interval_seconds(cfg: Config, d: Derived, n_params: float, step_s: float) -> float:
    """train.checkpoint_interval steps when set, else the Young/Daly interval."""
    if cfg.train.checkpoint_interval:
        return cfg.train.checkpoint_interval * step_s
    write = checkpoint_write_seconds(cfg, n_params)
    return young_daly_interval_seconds(write, job_mtbf_hours(cfg, d) * 3600)


def checkpoint_interval_steps(cfg: Config, d: Derived, n_params: float, step_s: float) -> int:
    """The checkpoint interval in whole steps (at least 1), for --save-interval."""
    return max(1, round(checkpoint_interval_seconds(cfg, d, n_params, step_s) / step_s))


def run_estimate(cfg: Config, d: Derived, n_params: float, step_s: float) -> dict:
    """The plan's ``run`` block.

    energy: GPU board power x PUE (GPU-hours x W = Wh; / 1e6 = MWh);
    expected_failures: GPU-hours / per-GPU MTBF; jobs_needed: wall clock / time limit.
    """
    c = cfg.cluster
    wall_s = d.steps * step_s
    gpu_hours = wall_s / 3600 * d.world_size
    return {
        "tokens": d.tokens,
        "steps": d.steps,
        "wall_clock_days": wall_s / SECONDS_PER_DAY,
        "gpu_hours": gpu_hours,
        "cost_usd": gpu_hours * c.usd_per_gpu_hour,
        "energy_mwh": gpu_hours * c.gpu.power_w * c.pue / 1e6,
        "expected_failures": gpu_hours / c.gpu.mtbf_hours,
        "checkpoint_interval_min": checkpoint_interval_seconds(cfg, d, n_params, step_s) / 60,
        "jobs_needed": max(1, math.ceil(wall_s / parse_time_limit(c.time_limit))),
    }
