"""Measured/predicted ratios from probe runs (``trainctl tune tune.probe=true``), applied to the estimate.

``cluster.calibration`` names a calibration.json written by ``trainctl tune``
(launch/verbs/probe.py): the geometric mean over the probes of measured/predicted step
time and, when they ran on GPUs, of peak memory. The estimator multiplies its
step time (and so throughput, MFU, wall clock and cost) and its per-stage memory
peaks by them. One pair of ratios per cluster: what the step-time model misses
on that cluster's network, kernels and software, assumed the same for every
layout, which is what a handful of probes can support.

The estimator takes the ratios as data (``Calibration``), never the file: the
verbs read it once at their edge with ``load_calibration`` (``launch/verbs/plan.py``
``make_plan``, ``launch/verbs/tune.py`` ``search``) and pass it down, so the models in
``launch/estimate/`` stay pure functions of their arguments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from launch.config.schema import Config
from launch.errors import UserError


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """What a calibration.json says, checked; the defaults are the bare model (no file)."""

    step_time_ratio: float = 1.0
    """Measured/predicted step time; multiplies the step-time model's prediction."""
    memory_ratio: float = 1.0
    """Measured/predicted tensor bytes; multiplies each stage's states and activations."""
    path: str | None = None
    """The file it came from (for the plan's report); None: uncalibrated."""


UNCALIBRATED = Calibration()
"""The bare model: what the estimator applies when no calibration is given."""


def load_calibration(cfg: Config) -> Calibration:
    """``cluster.calibration``'s file, read and checked once; ``UNCALIBRATED`` when it is not set.

    ``UserError`` (naming the key, the file and the fix) for a file that cannot be read, is not the
    JSON trainctl writes, holds a ratio out of ``RATIO_RANGE``, or was measured on another cluster.
    """
    path = cfg.cluster.calibration
    if not path:
        return UNCALIBRATED
    data = _read(str(Path(path).expanduser().absolute()))
    if data.get("cluster") != cfg.cluster.name:
        raise UserError(f"cluster.calibration={path}: measured on cluster {data.get('cluster')!r}, and this config "
                        f"runs on {cfg.cluster.name!r}\n  fix: probe this cluster (trainctl tune ... tune.probe=true), "
                        "or cluster.calibration=null")
    return Calibration(step_time_ratio=data.get("step_time_ratio") or 1.0,
                       memory_ratio=data.get("memory_ratio") or 1.0, path=path)


RATIO_RANGE = (0.001, 1000.0)
"""Ratios outside it are a broken file, not a measurement. Wide on purpose: a CPU cluster profile
(slurm_local) is ~30x slower than its nominal peak says."""


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
