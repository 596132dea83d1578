"""``trainctl prepare``: build the shards here, or submit them as a Slurm job array.

``data.prepare_on=here`` runs ``launch.data.prepare.prepare`` in this process
and prints the report; ``data.prepare_on=slurm`` hands the unfinished shards to
``launch.data.array`` and returns at once. This module sits above both, so
neither imports the other.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf
from rich.console import Console

from launch.config import derive
from launch.config.schema import PrepareOn
from launch.data.array import submit_prepare
from launch.data.prepare import REPORT, prepare, prepare_table
from launch.record.write import dump_json


def run_prepare(composed, run_dir: Path, command: list[str]) -> None:
    """Prepare the shards, print the report, write {prepared_dir}/prepare.json and RUN_DIR/prepare.json.

    RUN_DIR gets the same figures (the epochs depend on this run's token budget);
    a failure leaves a run directory this command created absent, as ``trainctl plan`` does.
    """
    fresh = not any(run_dir.iterdir()) if run_dir.is_dir() else True
    if composed.data.prepare_on == PrepareOn.slurm:
        if submit_prepare(OmegaConf.to_object(composed), composed, run_dir):
            return
    try:
        cfg = OmegaConf.to_object(composed)
        numbers = prepare(cfg, derive(cfg).tokens)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / REPORT).write_text(dump_json(numbers))
    except BaseException:
        shards_inside = Path(composed.data.prepared_dir).absolute().is_relative_to(run_dir)
        if fresh and not shards_inside:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    Console().print(prepare_table(numbers))
    print(f"wrote {numbers['prepared_dir']}/: " + ", ".join(f"{n}.{{bin,idx,json}}" for n in numbers["sources"])
          + f", {REPORT}; and {run_dir}/{REPORT}")
    sys.stdout.flush()
