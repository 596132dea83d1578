"""cluster=local: ``submit`` runs RUN_DIR/launch.sh (torchrun on this machine) in the foreground.

The run is recorded in job.json as ``local:PID`` while it runs, with its exit
code once it ends. A record whose process is gone (killed, machine rebooted)
does not block a new submission: a pid counts as this run only while it is
alive and its command line names this run's directory (``jobs.local_state``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from launch.errors import UserError
from launch.record import jobs


def submit(run_dir: Path) -> str:
    """Run launch.sh, recorded in job.json; returns its id once it has finished."""
    script = run_dir / "launch.sh"
    proc = subprocess.Popen(["bash", str(script)])
    job_id = f"{jobs.LOCAL_PREFIX}{proc.pid}"
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
