"""Submission records: ``RUN_DIR/job.json`` for a run, ``SWEEP_DIR/sweep.json`` for a sweep.

``job.json`` lists every job submitted for the run, newest last, with the
sha256 of the exact script sbatch got and the time; a requeued job keeps its id.
The records are rewritten whole through a temporary file and a rename, so a
reader never sees half of one.

A local job (cluster=local, ``local:PID``) has no scheduler to ask, so its
state is read here, from its record and from whether its process still runs; a
Slurm job's state comes from ``slurm.states``. ``local.py`` starts local jobs
and records them through this module.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from pathlib import Path

from launch.errors import UserError
from launch.executors.slurm import JobState, states
from launch.record.write import write_file

JOB_RECORD = "job.json"
SWEEP_RECORD = "sweep.json"
PIPELINE_RECORD = "pipeline.json"
LOCAL_PREFIX = "local:"
"""A local job's id is this prefix and the pid of its launch.sh."""
STOPPED_LOCAL = "STOPPED_AT_CHECKPOINT"
"""A local run a stop signal or Ctrl-C ended after its checkpoint (Slurm's STOPPED means a paused job)."""


SHAPES = {JOB_RECORD: ("jobs", "job_id"), SWEEP_RECORD: ("points", "run_dir"), PIPELINE_RECORD: ("stages", "run_dir")}
"""Each record's list and the key every entry of it has."""


def read(path: Path) -> dict | None:
    """A job record, or None where there is none; ``UserError`` naming it when it is damaged."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # unreadable, not JSON, not UTF-8
        raise UserError(f"{path}: not valid JSON ({exc})\n  fix: restore it, or remove it to forget the jobs") from None
    items, key = SHAPES.get(path.name, (None, None))
    if items and not (isinstance(data, dict) and isinstance(data.get(items), list)
                      and all(isinstance(e, dict) and isinstance(e.get(key), str) for e in data[items])):
        raise UserError(f"{path}: not a {path.name} trainctl wrote (a list '{items}' whose entries each have "
                        f"'{key}')\n  fix: restore it, or remove it to forget the jobs")
    return data


def write(path: Path, data: dict) -> None:
    write_file(path, json.dumps(data, indent=2) + "\n")


def record_submission(run_dir: Path, job_id: str, script: Path, *, scheduler: str = "slurm",
                      dependency: str | None = None, array_tasks: list[str] | None = None) -> dict:
    """Append one submission to RUN_DIR/job.json; returns the entry. ``array_tasks`` names a job array's tasks."""
    entry = {"job_id": job_id, "scheduler": scheduler, "submitted_utc": _now(),
             "script": script.name, "script_sha256": hashlib.sha256(script.read_bytes()).hexdigest(),
             "dependency": dependency}
    if array_tasks:
        entry["array_tasks"] = list(array_tasks)
    record = read(run_dir / JOB_RECORD) or {"jobs": []}
    record["jobs"].append(entry)
    write(run_dir / JOB_RECORD, record)
    return entry


def record_exit(run_dir: Path, job_id: str, code: int, *, outcome: str | None = None) -> None:
    """Note a local run's exit code, and its outcome record's verdict where it wrote one, on its entry."""
    record = read(run_dir / JOB_RECORD) or {"jobs": []}
    for entry in record["jobs"]:
        if entry["job_id"] == job_id:
            entry["exit_code"] = code
            entry["ended_utc"] = _now()
            if outcome:
                entry["outcome"] = outcome
    write(run_dir / JOB_RECORD, record)


def latest_job_id(run_dir: Path) -> str | None:
    record = read(run_dir / JOB_RECORD)
    return record["jobs"][-1]["job_id"] if record and record.get("jobs") else None


def refuse_if_active(run_dir: Path) -> None:
    """A run whose last job is still pending or running is not planned, rendered or submitted again.

    Its job reads RUN_DIR/config.yaml when it starts, and again when it is requeued.
    Where Slurm's tools are absent (a laptop with a copied run), there is nothing to ask.
    """
    job_id = latest_job_id(run_dir)
    if is_local(job_id):
        state = local_state(run_dir)
    elif job_id is None or shutil.which("scontrol") is None:
        return
    else:
        found = states([job_id])  # a job array answers with its tasks, JOBID_i
        tasks = [v for k, v in found.items() if k == job_id or k.startswith(f"{job_id}_")]
        state = next((t for t in tasks if t.active), tasks[0] if tasks else None)
    if state is not None and state.active:
        raise UserError(f"{run_dir}: its job {job_id} is still {state.state}; writing this run again would "
                        "change the config under it (and submitting would run two jobs in one directory)\n"
                        "  fix: wait for it (`trainctl status "
                        f"{run_dir}`), cancel it (`trainctl cancel {run_dir}`), or choose another name=")


def is_local(job_id: str | None) -> bool:
    return bool(job_id) and job_id.startswith(LOCAL_PREFIX)


def local_alive(job_id: str, run_dir: Path) -> bool:
    """A pid counts as this run only while it is alive and its command line names this run's directory.

    Both sides are compared resolved: the command line holds the absolute path ``submit`` wrote,
    while ``trainctl status runs/NAME`` is typed relative (or through another symlink).
    """
    pid = job_id.removeprefix(LOCAL_PREFIX)
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    here = os.path.realpath(run_dir)
    return any(a and os.path.realpath(os.path.join(cwd, a)) in (here, os.path.join(here, "launch.sh")) for a in args)


def local_state(run_dir: Path) -> JobState | None:
    """The state of the run's latest local job (None if its latest job is not local)."""
    record = read(run_dir / JOB_RECORD)
    if not record or not record.get("jobs") or not is_local(record["jobs"][-1]["job_id"]):
        return None
    last = record["jobs"][-1]
    if local_alive(last["job_id"], run_dir):
        return JobState(job_id=last["job_id"], state="RUNNING")
    code = last.get("exit_code")
    if code is None:
        return JobState(job_id=last["job_id"], state="GONE", reason="ended without a record (killed?)")
    state = "COMPLETED" if code == 0 else STOPPED_LOCAL if last.get("outcome") == "stopped" else "FAILED"
    return JobState(job_id=last["job_id"], state=state, exit_code=str(code))


def add_sweep_point(sweep_dir: Path, point: dict) -> None:
    """Add (or replace, by run_dir) one point in SWEEP_DIR/sweep.json."""
    record = read(sweep_dir / SWEEP_RECORD) or {"points": []}
    record["points"] = [p for p in record["points"] if p["run_dir"] != point["run_dir"]] + [point]
    write(sweep_dir / SWEEP_RECORD, record)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
