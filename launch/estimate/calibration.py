"""Measured/predicted ratios from probe runs (``trainctl tune tune.probe=true``), applied to the estimate.

``cluster.calibration`` names a calibration.json written by ``trainctl tune``
(launch/probe.py): the geometric mean over the probes of measured/predicted step
time and, when they ran on GPUs, of peak memory. The estimator multiplies its
step time (and so throughput, MFU, wall clock and cost) and its per-stage memory
peaks by them. One pair of ratios per cluster: what the step-time model misses
on that cluster's network, kernels and software, assumed the same for every
layout, which is what a handful of probes can support.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from launch.config.schema import Config
from launch.errors import UserError


def step_time_ratio(cfg: Config) -> float:
    return _ratios(cfg)[0]


def memory_ratio(cfg: Config) -> float:
    return _ratios(cfg)[1]


def _ratios(cfg: Config) -> tuple[float, float]:
    path = cfg.cluster.calibration
    if not path:
        return 1.0, 1.0
    data = _read(str(Path(path).expanduser().absolute()))
    if data.get("cluster") != cfg.cluster.name:
        raise UserError(f"cluster.calibration={path}: measured on cluster {data.get('cluster')!r}, and this config "
                        f"runs on {cfg.cluster.name!r}\n  fix: probe this cluster (trainctl tune ... tune.probe=true), "
                        "or cluster.calibration=null")
    return data.get("step_time_ratio") or 1.0, data.get("memory_ratio") or 1.0


RATIO_RANGE = (0.001, 1000.0)
"""Ratios outside it are a broken file, not a measurement. Wide on purpose: a CPU cluster profile
(slurm_local) is ~30x slower than its nominal peak says."""


@lru_cache(maxsize=8)
def _read(path: str) -> dict:
    fix = "  fix: the calibration.json `trainctl tune` wrote after its probes, or cluster.calibration=null"
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UserError(f"cluster.calibration={path}: cannot be read ({exc.strerror})\n{fix}") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError; so are Infinity's overflows
        raise UserError(f"cluster.calibration={path}: not JSON ({exc})\n{fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"cluster.calibration={path}: holds a {type(data).__name__}, not the object trainctl "
                        f"writes\n{fix}")
    low, high = RATIO_RANGE
    for key in ("step_time_ratio", "memory_ratio"):
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise UserError(f"cluster.calibration={path}: {key}={value} must be a number from {low} to {high} "
                            "or null\n  fix: rerun `trainctl tune` on the probes' run directory")
    return data
