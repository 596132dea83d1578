"""``trainctl submit``: render the run, then hand its job script to the scheduler and return.

Before anything is written, submit refuses what cannot run: a run directory
whose job is still pending or running, a stage whose trainer is not built, a
scheduler it cannot submit to. After the records are written it calls
``sbatch`` once (or ``sbatch --test-only`` with ``submit.preflight=true``) and
records the job in ``RUN_DIR/job.json``; in a sweep, each point also lands in
the sweep directory's ``sweep.json``.
"""

from __future__ import annotations

from pathlib import Path

from launch.config.schema import Config, Scheduler
from launch.errors import UserError

TRAINING_BUILT: set[tuple[str, str]] = set()
"""(backend, stage) pairs whose trainer exists; the trainer issues add theirs."""


def check_submittable(cfg: Config, run_dir: Path) -> None:
    """Every reason this run cannot be submitted, before anything is written."""
    if cfg.cluster.scheduler != Scheduler.slurm:
        raise UserError(f"cluster.scheduler: {cfg.cluster.scheduler.name!r}: submit on this machine is not built "
                        "yet (issue 6)\n  fix: `trainctl render` and run RUN_DIR/launch.sh yourself, or submit to "
                        "a SLURM cluster (cluster=h100, or cluster=slurm_local for the local test cluster)")
    backend, stage = cfg.backend.name.name, cfg.stage.kind.name
    if cfg.train.rank_check_s <= 0 and (backend, stage) not in TRAINING_BUILT:
        raise UserError(f"stage={stage}, backend={backend}: training for this stage on this backend is not built "
                        "yet, so a job would start and fail\n  fix: `trainctl plan`/`render` work for it; to check "
                        "an allocation instead, submit with train.rank_check_s=60")
    if not cfg.submit.preflight:
        from launch.executors.jobs import refuse_if_active

        refuse_if_active(run_dir)


def submit_rendered(plan, run_dir: Path, sweep_dir: Path | None, overrides: list[str]) -> str | None:
    """sbatch the run's job.sbatch (already written); the job id, or None for a preflight."""
    from launch.executors import jobs, slurm

    script = run_dir / "job.sbatch"
    if plan.cfg.submit.preflight:
        answer = slurm.test_only(script)
        print(f"preflight (sbatch --test-only, nothing queued): {answer}")
        return None
    job_id = slurm.submit(script)
    jobs.record_submission(run_dir, job_id, script)
    if sweep_dir is not None:
        jobs.add_sweep_point(sweep_dir, sweep_point(plan.numbers, run_dir, overrides, job_id))
    print(f"submitted job {job_id}: {run_dir}")
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
