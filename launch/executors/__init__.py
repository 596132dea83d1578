"""Job scripts and the schedulers that run them.

``render`` writes the script ``submit`` runs: ``job.sbatch`` on a SLURM cluster
(``sbatch.py`` fills ``slurm/job.sbatch.j2``), ``launch.sh`` on cluster=local.
``slurm.py`` talks to Slurm (sbatch, squeue, scontrol, sacct, scancel);
``jobs.py`` keeps each run's ``job.json``.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from launch.config import Config
from launch.config.schema import Scheduler
from launch.executors.sbatch import TORCHRUN_SIGNALS, render_sbatch

_LOCAL = """#!/usr/bin/env bash
# trainctl local launch: {nproc} process(es) on this machine, started by torchrun
# (launch/train/launcher.py: torchrun, quiet about the stop signals it forwards).
# SIGTERM, SIGUSR1 or Ctrl-C (SIGINT) reach every rank: each finishes its step and
# they save a checkpoint; a second Ctrl-C stops at once. No rank outlives torchrun.
set -euo pipefail
exec {python} -m launch.train.launcher --standalone --nproc-per-node={nproc} \\
  --signals-to-handle={signals} --shutdown-timeout={shutdown_s} -m launch.train {run_dir}
"""
LOCAL_SHUTDOWN_S = 120
"""How long torchrun waits for the ranks to save and stop after a stop signal before it kills them."""


def job_script(cfg: Config, run_dir: Path, numbers: dict) -> tuple[str, str]:
    """The job script's file name and text for this run."""
    if cfg.cluster.scheduler == Scheduler.slurm:
        return "job.sbatch", render_sbatch(cfg, run_dir, numbers)
    return "launch.sh", _LOCAL.format(nproc=cfg.cluster.gpus_per_node, python=shlex.quote(cfg.cluster.python),
                                      run_dir=shlex.quote(str(run_dir)), signals=TORCHRUN_SIGNALS,
                                      shutdown_s=LOCAL_SHUTDOWN_S)
