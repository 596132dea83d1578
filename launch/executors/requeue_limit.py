"""How many times a run's job may requeue itself (``MAX_REQUEUES`` in job.sbatch): from the plan.

A fixed limit does not fit every run: the plan's 8B, 70B and 405B H100 recipes
need 111, 509 and 486 jobs of four hours, and a run that hits its limit stops
for good part-way. So ``cluster.max_requeues: null`` (the default) takes the
number from the plan (``plan.json`` ``run``):

- ``jobs_needed - 1`` requeues at the time limit (wall clock / ``cluster.time_limit``);
- one per expected failure (``expected_failures``, GPU-hours / the profile's MTBF):
  a crash ends a job early and its requeue starts a new one;

and adds a margin, ``x 1.25 + 10``, for what the plan does not count:

- the Poisson spread of the failures: for the 405B plan's 627, three standard
  deviations are 75 (12%); the margin gives 278 more requeues than the mean;
- the work lost at each failure (the steps since the last checkpoint, on average
  half an interval, plus the restart): it lengthens the run, by about a tenth for
  the 405B plan (627 x (19 / 2 + 10) min = 200 h, ~50 more jobs of 4 h);
- a step-time estimate that is optimistic (uncalibrated, see
  ``cluster.calibration``), and preemptions, which Slurm requeues itself and which
  count in ``SLURM_RESTART_COUNT`` too but which no plan can know;
- the fixed 10: a run of one job still survives a few preemptions or crashes.

The crash budget (``cluster.max_crash_requeues``) stops a run that crashes
without progress; this limit is only the backstop that ends a run which would
otherwise requeue forever.
"""

from __future__ import annotations

import math

from launch.config import Config
from launch.config.schema import Scheduler

MARGIN = 1.25
"""Multiplies the requeues the plan expects; why 1.25: the module docstring."""
SLACK = 10
"""Requeues added to every default limit (a one-job run still survives a few preemptions)."""


def requeues_needed(run: dict) -> int:
    """The requeues the plan itself expects: one per job after the first, one per expected failure.

    ``run`` is plan.json's ``run`` block. The failures are rounded to the nearest
    whole one, so that a short run (0.001 expected failures) needs none.
    """
    return run["jobs_needed"] - 1 + math.floor(run["expected_failures"] + 0.5)


def requeue_limit(cfg: Config, run: dict) -> int:
    """``cluster.max_requeues``, or when it is null the plan's need x MARGIN + SLACK."""
    if cfg.cluster.max_requeues is not None:
        return cfg.cluster.max_requeues
    return _with_margin(requeues_needed(run))


def _with_margin(needed: int) -> int:
    return math.ceil(MARGIN * needed) + SLACK


def requeue_problem(cfg: Config, run: dict) -> str | None:
    """A message when an explicit ``cluster.max_requeues`` is below what the plan needs, else None.

    Checked at ``plan`` (after the estimate, which is where the need comes from):
    such a run would stop for good before it finishes, days into it.
    """
    limit = cfg.cluster.max_requeues
    if cfg.cluster.scheduler != Scheduler.slurm or limit is None:
        return None
    needed = requeues_needed(run)
    if limit >= needed:
        return None
    return (f"cluster.max_requeues={limit}: the plan needs {needed} requeues ({run['jobs_needed']} jobs of "
            f"{cfg.cluster.time_limit} = {run['jobs_needed'] - 1} at the time limit, plus "
            f"{run['expected_failures']:.3g} expected failures), so the run would stop for good part-way\n"
            f"  fix: cluster.max_requeues=null (the plan's {needed} with a margin: "
            f"{_with_margin(needed)}), cluster.max_requeues={needed} or more, or a longer "
            "cluster.time_limit")
