"""What the whole run costs: wall clock, GPU-hours, dollars, energy, CO2, failures,
the checkpoint interval, and how many SLURM jobs the time limit splits it into.

``run_costs`` holds every formula; ``trainctl plan`` (``run_estimate``, wall clock
= steps x modelled step time) and ``trainctl size`` (wall clock = 6ND / (GPUs x
peak x MFU)) both call it, so the two commands cannot disagree on a formula.

Not modelled yet: time lost to failures and restarts, checkpoint stalls, queue
waits, evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from launch.config.derive import Derived
from launch.config.schema import ClusterConfig, Config
from launch.config.slurm_time import parse_time_limit
from launch.estimate.memory import bytes_per_param

SECONDS_PER_DAY = 86400
WH_PER_MWH = 1e6


@dataclass(frozen=True, kw_only=True)
class Facility:
    """The numbers of a cluster profile (``conf/cluster/*.yaml``) that a run's cost depends on."""

    usd_per_gpu_hour: float
    gpu_power_w: float
    """GPU board power at full load, W."""
    node_overhead_w: float
    """Power per GPU beyond the board (CPUs, NICs, fans), W."""
    pue: float
    grid_kgco2_per_kwh: float
    gpu_mtbf_hours: float
    """Mean hours between job-interrupting failures of one GPU."""
    checkpoint_write_gbps: float
    """Aggregate write bandwidth to checkpoint storage, GB/s."""
    time_limit_s: float
    """Per-job wall-clock limit, seconds (math.inf for none)."""

    @classmethod
    def of(cls, cluster: ClusterConfig) -> Facility:
        return cls(
            usd_per_gpu_hour=cluster.usd_per_gpu_hour,
            gpu_power_w=cluster.gpu.power_w,
            node_overhead_w=cluster.node_overhead_w,
            pue=cluster.pue,
            grid_kgco2_per_kwh=cluster.grid_kgco2_per_kwh,
            gpu_mtbf_hours=cluster.gpu.mtbf_hours,
            checkpoint_write_gbps=cluster.checkpoint_write_gbps,
            time_limit_s=parse_time_limit(cluster.time_limit),
        )


def energy_mwh(gpu_hours: float, gpu_power_w: float, node_overhead_w: float, pue: float) -> float:
    """Facility energy: GPU-hours x (board + node share) W x PUE, in MWh.

    Patterson et al. 2021, "Carbon Emissions and Large Neural Network Training"
    (arXiv:2104.10350): MWh = hours to train x processors x average power per
    processor x PUE; the node overhead is each GPU's share of its server. Here the board's full-load
    power stands in for the measured average, so this is an upper estimate.
    """
    return gpu_hours * (gpu_power_w + node_overhead_w) * pue / WH_PER_MWH


def co2_tonnes(energy: float, grid_kgco2_per_kwh: float) -> float:
    """Operational emissions: MWh x grid intensity (Patterson et al. 2021: tCO2e = MWh x tCO2e per MWh).

    kg/kWh and t/MWh are the same number, so tonnes = MWh x kg/kWh.
    """
    return energy * grid_kgco2_per_kwh


def expected_failures(gpu_hours: float, gpu_mtbf_hours: float) -> float:
    """Expected job-interrupting failures: GPU-hours / per-GPU MTBF.

    Independent failures at a constant rate (Poisson). The rate behind the h100
    profile's 50,700 h: Llama 3 (Dubey et al. 2024, sec. 3.3.4), 419 unexpected
    interruptions in 54 days on 16,384 GPUs.
    """
    return gpu_hours / gpu_mtbf_hours


def cluster_mtbf_hours(gpu_mtbf_hours: float, world_size: int) -> float:
    """Mean time between failures of the whole job: per-GPU MTBF / world size.

    The first of n independent exponential failure clocks of mean M rings after M / n
    (the minimum of exponentials is exponential with the rates summed).
    """
    return gpu_mtbf_hours / world_size


def young_daly_interval_seconds(write_seconds: float, mtbf_seconds: float) -> float:
    """Optimal checkpoint interval sqrt(2 * C * M) for checkpoint cost C and job MTBF M.

    Young 1974, "A first order approximation to the optimum checkpoint interval"
    (CACM 17(9)); Daly 2006, "A higher order estimate of the optimum checkpoint
    interval for restart dumps" (FGCS 22(3)), whose first-order term this is
    (good while C << M).
    """
    return math.sqrt(2 * write_seconds * mtbf_seconds)


def jobs_needed(wall_seconds: float, time_limit_seconds: float) -> int:
    """SLURM jobs of at most the time limit that the run needs: ceil(wall clock / limit), at least 1."""
    return max(1, math.ceil(wall_seconds / time_limit_seconds))


def run_costs(wall_seconds: float, world_size: int, facility: Facility, checkpoint_write_s: float,
              checkpoint_interval_s: float | None = None) -> dict:
    """The cost of ``wall_seconds`` on ``world_size`` GPUs: the run block's keys after tokens and steps.

    ``checkpoint_interval_s``: a fixed interval; None chooses the Young/Daly one
    for a checkpoint that takes ``checkpoint_write_s`` to write.
    """
    f = facility
    gpu_hours = wall_seconds / 3600 * world_size
    energy = energy_mwh(gpu_hours, f.gpu_power_w, f.node_overhead_w, f.pue)
    mtbf_h = cluster_mtbf_hours(f.gpu_mtbf_hours, world_size)
    if checkpoint_interval_s is None:
        checkpoint_interval_s = young_daly_interval_seconds(checkpoint_write_s, mtbf_h * 3600)
    return {
        "wall_clock_days": wall_seconds / SECONDS_PER_DAY,
        "gpu_hours": gpu_hours,
        "cost_usd": gpu_hours * f.usd_per_gpu_hour,
        "energy_mwh": energy,
        "co2_tonnes": co2_tonnes(energy, f.grid_kgco2_per_kwh),
        "expected_failures": expected_failures(gpu_hours, f.gpu_mtbf_hours),
        "mtbf_cluster_min": mtbf_h * 60,
        "checkpoint_interval_min": checkpoint_interval_s / 60,
        "jobs_needed": jobs_needed(wall_seconds, f.time_limit_s),
    }


# ---- plan: the checkpoint of a configured run ------------------------------------------

def checkpoint_bytes(cfg: Config, n_params: float) -> float:
    """Bytes of one checkpoint: weights and optimizer state (gradients are not saved).

    Mixed precision: 2 (bf16 weights) + 12 (fp32 master, Adam m, v) = 14 B per
    parameter; fp32: 4 + 8 = 12 B.
    """
    b = bytes_per_param(cfg)
    return n_params * (b.weights + b.optimizer)


def checkpoint_write_seconds(cfg: Config, n_params: float) -> float:
    """Checkpoint bytes / cluster.checkpoint_write_gbps."""
    return checkpoint_bytes(cfg, n_params) / (cfg.cluster.checkpoint_write_gbps * 1e9)


def job_mtbf_hours(cfg: Config, d: Derived) -> float:
    """Mean time between interruptions of the job: one GPU's MTBF / world size."""
    return cluster_mtbf_hours(cfg.cluster.gpu.mtbf_hours, d.world_size)


def checkpoint_interval_seconds(cfg: Config, d: Derived, n_params: float, step_s: float) -> float:
    """train.checkpoint_interval steps when set, else the Young/Daly interval."""
    if cfg.train.checkpoint_interval:
        return cfg.train.checkpoint_interval * step_s
    write = checkpoint_write_seconds(cfg, n_params)
    return young_daly_interval_seconds(write, job_mtbf_hours(cfg, d) * 3600)


def run_estimate(cfg: Config, d: Derived, n_params: float, step_s: float) -> dict:
    """The plan's ``run`` block: tokens, steps, then ``run_costs`` of the run's time on the world size.

    The time is full-batch steps x step time; a batch ramp-up's smaller steps count in proportion to
    their batch (samples / global batch), which ignores their lower efficiency (more pipeline bubble).
    """
    wall_s = d.samples / max(cfg.train.global_batch_size, 1) * step_s
    return {
        "tokens": d.tokens,
        "steps": d.steps,
        **run_costs(wall_s, d.world_size, Facility.of(cfg.cluster), checkpoint_write_seconds(cfg, n_params),
                    checkpoint_interval_seconds(cfg, d, n_params, step_s)),
    }
