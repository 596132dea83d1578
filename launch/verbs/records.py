"""What ``plan``, ``render`` and ``submit`` write: each run's records, checked in full before any is written.

A command writes one run, or every stage of a pipeline (``launch/verbs/pipeline.py``).
All of them are planned and rendered in memory first; only when none has a
problem are their directories written, so a bad stage leaves no stage behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from launch.backends import artifacts
from launch.verbs.chart import matplotlib_available, memory_chart_png
from launch.errors import UserError
from launch.estimate.memory import stage_memory
from launch.executors import job_script
from launch.record.jobs import refuse_if_active
from launch.verbs.oom import memory_problem
from launch.verbs.pipeline import Unit, units
from launch.verbs.plan import make_plan
from launch.verbs.report import print_plan
from launch.record.read import plan_json
from launch.record.write import dump_json, meta, write_run


def write_records(composed, run_dir: Path, command: list[str], overrides: list[str], *, with_job_script: bool,
                  check: Callable[[object, Path], None] | None = None) -> list[tuple[Unit, object]]:
    """Plan (and render) every unit, then write them; returns (unit, plan) pairs.

    ``check(cfg, run_dir)`` runs per unit before anything is written (submit's refusals).
    """
    todo, problems = [], []
    fresh = not run_dir.is_dir() or not any(run_dir.iterdir())
    try:
        planned = units(composed, run_dir, overrides)
    except UserError:
        _remove_if(fresh, run_dir)
        raise
    for unit in planned:
        try:
            refuse_if_active(unit.run_dir)  # a requeued job would read the new config.yaml
            plan = make_plan(unit.composed)
            if check is not None:
                check(plan.cfg, unit.run_dir)
            todo.append((unit, plan, run_files(plan, unit.run_dir, command, unit.overrides, with_job_script)))
        except UserError as exc:
            problems += [f"pipeline stage {unit.stage!r}: {p}" if unit.stage else p for p in exc.problems]
    if problems:
        _remove_if(fresh, run_dir)  # Hydra made it for this point; nothing is written into it
        raise UserError(problems)
    for unit, plan, files in todo:
        fresh_unit = not unit.run_dir.is_dir() or not any(unit.run_dir.iterdir())
        try:
            write_run(unit.run_dir, files)
        except BaseException:
            _remove_if(fresh_unit, unit.run_dir)
            raise
        if unit.stage:
            print(f"\npipeline stage {unit.stage!r}:")
        print_plan(plan)
        print(f"wrote {unit.run_dir}/: {', '.join(sorted(files))}")
    return [(unit, plan) for unit, plan, _ in todo]


def _remove_if(fresh: bool, directory: Path) -> None:
    if fresh:
        shutil.rmtree(directory, ignore_errors=True)


def run_files(plan, run_dir: Path, command: list[str], overrides: list[str],
              with_job_script: bool) -> dict[str, str | bytes]:
    files: dict[str, str | bytes] = {
        "config.yaml": plan.config_yaml,
        "overrides.yaml": "".join(f"- {json.dumps(o)}\n" for o in overrides) or "[]\n",  # JSON strings are YAML
        "meta.json": dump_json(meta(command)),
    }
    if with_job_script:
        files.update(launch_files(plan, run_dir))
    files["plan.json"] = plan_json(plan.numbers)
    return files


def launch_files(plan, run_dir: Path) -> dict[str, str | bytes]:
    """What ``render`` adds to the records: the backend's files, the job script, plan.png.

    Refuses (UserError) a layout the memory estimate says will not fit: a job
    script is what gets submitted.
    """
    oom = memory_problem(plan.cfg, plan.numbers["memory_gib"]["per_gpu_peak"], plan.calibration)
    if oom:
        raise UserError(oom)
    files: dict[str, str | bytes] = artifacts(plan.cfg, plan.derived, run_dir=run_dir, numbers=plan.numbers)
    name, text = job_script(plan.cfg, run_dir, plan.numbers)
    files[name] = text
    if matplotlib_available():  # matplotlib takes seconds to load: render only, never plan
        stages = [s.breakdown_gib() for s in stage_memory(plan.cfg, plan.derived, plan.calibration)]
        files["plan.png"] = memory_chart_png(stages, plan.cfg.cluster.gpu.hbm_gib,
                                             f"{plan.cfg.name}: memory per GPU by pipeline stage")
    return files
