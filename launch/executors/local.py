"""cluster=local: ``submit`` runs RUN_DIR/launch.sh (torchrun on this machine) in the foreground.

The run is recorded in job.json as ``local:PID`` while it runs, with its exit
code once it ends. A record whose process is gone (killed, machine rebooted)
does not block a new submission: a pid counts as this run only while it is
alive and its command line names this run's directory.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from launch.errors import UserError
from launch.executors import jobs
from launch.executors.slurm import JobState

PREFIX = "local:"


def is_local(job_id: str | None) -> bool:
    return bool(job_id) and job_id.startswith(PREFIX)


def submit(run_dir: Path) -> str:
    """Run launch.sh, recorded in job.json; returns its id once it has finished."""
    script = run_dir / "launch.sh"
    proc = subprocess.Popen(["bash", str(script)])
    job_id = f"{PREFIX}{proc.pid}"
    jobs.record_submission(run_dir, job_id, script, scheduler="local")
    print(f"started {job_id} in the foreground: {run_dir} (Ctrl-C stops it; the same command resumes it)",
          flush=True)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        code = proc.wait()  # torchrun got the SIGINT too and stops its ranks
    jobs.record_exit(run_dir, job_id, code)
    if code != 0:
        raise UserError(f"{run_dir}: the local run ended with exit code {code}; its output is above\n"
                        "  fix: correct what it reports, then run the same command again (it resumes)")
    print(f"finished {job_id}: {run_dir}")
    return job_id


def alive(job_id: str, run_dir: Path) -> bool:
    pid = job_id.removeprefix(PREFIX)
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return str(run_dir) in args or str(run_dir / "launch.sh") in args


def state(run_dir: Path) -> JobState | None:
    """The state of the run's latest local job (None if its latest job is not local)."""
    record = jobs.read(run_dir / jobs.JOB_RECORD)
    if not record or not record.get("jobs") or not is_local(record["jobs"][-1]["job_id"]):
        return None
    last = record["jobs"][-1]
    if alive(last["job_id"], run_dir):
        return JobState(job_id=last["job_id"], state="RUNNING")
    code = last.get("exit_code")
    if code is None:
        return JobState(job_id=last["job_id"], state="GONE", reason="ended without a record (killed?)")
    return JobState(job_id=last["job_id"], state="COMPLETED" if code == 0 else "FAILED", exit_code=str(code))
