"""Job scripts. This is a placeholder until the executor issues land.

``render`` writes the script a later ``submit`` will run: ``job.sbatch`` on a
SLURM cluster, ``launch.sh`` on cluster=local. Rendering the real sbatch script
(issue 5) and the local torchrun launch (issue 6) replace this module's body.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from launch.config import Config
from launch.config.schema import Scheduler

_PLACEHOLDER = """#!/usr/bin/env bash
# trainctl {kind} for run {name!s}
# PLACEHOLDER: trainctl does not render a runnable {kind} yet ({issue}).
# The run's resolved config and plan are beside this file:
#   {run_dir}/config.yaml  {run_dir}/plan.json
echo "trainctl: {kind} rendering is not built yet ({issue})" >&2
exit 1
"""


def job_script(cfg: Config, run_dir: Path) -> tuple[str, str]:
    """The job script's file name and text for this run."""
    if cfg.cluster.scheduler == Scheduler.slurm:
        name, kind, issue = "job.sbatch", "sbatch script", "issue 5: SLURM executor"
    else:
        name, kind, issue = "launch.sh", "local launch script", "issue 6: training entrypoint"
    text = _PLACEHOLDER.format(kind=kind, issue=issue, name=shlex.quote(cfg.name),
                               run_dir=shlex.quote(str(run_dir)))
    return name, text
