"""``trainctl submit``: render the run, then hand its job script to the scheduler and return.

Before anything is written, submit refuses what cannot run: a run directory
whose job is still pending or running, a stage whose trainer is not built, a
scheduler it cannot submit to, an interpreter without the backend's engines or
a run directory the nodes cannot see (launch/executors/interpreter.py). After the records are written it calls
``sbatch`` once (or ``sbatch --test-only`` with ``submit.preflight=true``) and
records the job in ``RUN_DIR/job.json``; in a sweep, each point also lands in
the sweep directory's ``sweep.json``.
"""

from __future__ import annotations

from pathlib import Path

from launch.config.schema import Config, Scheduler, StageKind
from launch.data.pairs import sources_problem
from launch.config.stages import trains
from launch.errors import UserError
from launch.executors import local, slurm
from launch.executors.interpreter import engines_problem, image_problem, shared_problem
from launch.record import jobs
from launch.executors.sbatch import render_array, resources
from launch.record.checkpoints import checkpoint_dir, directory_problem, resume_problem

ARRAY: list | None = None
"""While the job-array launcher runs a sweep (plugins/hydra_plugins), the points
rendered so far as (plan, run_dir, overrides): they are submitted together, as
one array, by ``submit_array`` instead of one sbatch each."""


def check_submittable(cfg: Config, run_dir: Path) -> None:
    """Every reason this run cannot be submitted, before anything is written."""
    backend, stage = cfg.backend.name.name, cfg.stage.kind.name
    if cfg.train.rank_check_s <= 0 and not trains(cfg.stage.kind, cfg.backend.name):
        raise UserError(f"stage={stage}, backend={backend}: training for this stage on this backend is not built "
                        "yet, so a job would start and fail\n  fix: `trainctl plan`/`render` work for it; to check "
                        "an allocation instead, submit with train.rank_check_s=60")
    if cfg.train.rank_check_s <= 0:
        refusal = (directory_problem(cfg, run_dir) or resume_problem(cfg, run_dir) or engines_problem(cfg)
                   or (sources_problem(cfg) if cfg.stage.kind == StageKind.dpo else None))
        if refusal:
            raise UserError(refusal)
    refusal = image_problem(cfg) or shared_problem(cfg, run_dir)  # a rank check runs on the nodes too
    if refusal:
        raise UserError(refusal)


def submit_written(written: list, run_dir: Path, sweep_dir: Path | None, lock_fd: int | None = None) -> None:
    """Submit what ``records.write_records`` wrote: one run, or a pipeline's stages chained by afterok.

    ``lock_fd``: the run directory's lock (``launch.record.lock.hold``), which a local run's launcher inherits.
    """
    if len(written) == 1 and written[0][0].stage is None:
        unit, plan = written[0]
        submit_rendered(plan, unit.run_dir, sweep_dir, unit.overrides, lock_fd=lock_fd)
        return
    if ARRAY is not None:
        raise UserError("a pipeline cannot be a point of a job array\n  fix: submit the sweep without "
                        "hydra/launcher=trainctl_array")
    stages, previous = [], None
    try:
        for unit, plan in written:
            dependency = f"afterok:{previous}" if previous else None
            previous = submit_rendered(plan, unit.run_dir, None, unit.overrides, dependency=dependency)
            stages.append({"name": unit.stage, "run_dir": str(unit.run_dir), "job_id": previous,
                           "dependency": dependency})
    finally:  # a stage sbatch refused leaves the earlier stages recorded: they are queued
        if stages and not written[0][1].cfg.submit.preflight:
            jobs.write(run_dir / jobs.PIPELINE_RECORD, {"stages": stages})
            print(f"pipeline of {len(stages)} stage(s): {run_dir}")


def submit_rendered(plan, run_dir: Path, sweep_dir: Path | None, overrides: list[str], *,
                    dependency: str | None = None, lock_fd: int | None = None) -> str | None:
    """sbatch the run's job.sbatch (already written); the job id, or None for a preflight."""
    if plan.cfg.cluster.scheduler == Scheduler.local:
        if plan.cfg.submit.preflight:
            print("preflight: cluster=local runs on this machine; there is no scheduler to ask")
            return None
        return local.submit(run_dir, checkpoint_dir(plan.cfg, run_dir), lock_fd)
    script = run_dir / "job.sbatch"
    if ARRAY is not None:
        ARRAY.append((plan, run_dir, overrides))
        return None
    if plan.cfg.submit.preflight:
        answer = slurm.test_only(script)
        print(f"preflight (sbatch --test-only, nothing queued): {answer}")
        return None
    job_id = slurm.submit(script, dependency=dependency)
    jobs.record_submission(run_dir, job_id, script, dependency=dependency)
    if sweep_dir is not None:
        jobs.add_sweep_point(sweep_dir, sweep_point(plan.numbers, run_dir, overrides, job_id))
    print(f"submitted job {job_id}{f' ({dependency})' if dependency else ''}: {run_dir}")
    return job_id


def sweep_point(numbers: dict, run_dir: Path, overrides: list[str], job_id: str | None) -> dict:
    """One line of sweep.json: what the point changed, what the plan predicts, its job."""
    return {
        "overrides": overrides, "run_dir": str(run_dir), "job_id": job_id,
        "plan": {"world_size": numbers["world_size"], "nodes": numbers["nodes"],
                 "per_gpu_peak_gib": numbers["memory_gib"]["per_gpu_peak"],
                 "step_time_s": numbers["throughput"]["step_time_s"],
                 "tflops_per_gpu": numbers["throughput"]["tflops_per_gpu"], "mfu": numbers["throughput"]["mfu"],
                 "wall_clock_days": numbers["run"]["wall_clock_days"], "cost_usd": numbers["run"]["cost_usd"]},
    }


def submit_array(points: list, sweep_dir: Path) -> str | None:
    """Submit rendered sweep points as one job array; every point must ask for the same resources.

    The array's script (SWEEP_DIR/array.sbatch) maps SLURM_ARRAY_TASK_ID to a
    point's run directory; each run's job.json records ``ARRAYID_INDEX``.
    """
    first = resources(points[0][0].cfg)
    for plan, run_dir, overrides in points[1:]:
        if resources(plan.cfg) != first:
            changed = {k: v for k, v in resources(plan.cfg).items() if first.get(k) != v}
            raise UserError(f"{run_dir}: this point asks for {changed}, the first point for "
                            f"{ {k: first.get(k) for k in changed} }; a job array gives every task the same "
                            "resources\n  fix: submit this sweep without hydra/launcher=trainctl_array "
                            "(one job per point, each with its own resources)")
    script = sweep_dir / "array.sbatch"
    script.write_text(render_array(points[0][0].cfg, [p[1] for p in points], sweep_dir,
                                   [p[0].numbers for p in points], [checkpoint_dir(p[0].cfg, p[1]) for p in points],
                                   cfgs=[p[0].cfg for p in points]))
    script.chmod(0o755)
    if points[0][0].cfg.submit.preflight:
        print(f"preflight of the job array (sbatch --test-only, nothing queued): {slurm.test_only(script)}")
        return None
    array_id = slurm.submit(script)
    for index, (plan, run_dir, overrides) in enumerate(points):
        job_id = f"{array_id}_{index}"
        jobs.record_submission(run_dir, job_id, script)
        jobs.add_sweep_point(sweep_dir, sweep_point(plan.numbers, run_dir, overrides, job_id))
    print(f"submitted job array {array_id} ({len(points)} tasks): {sweep_dir}")
    return array_id
