"""Talking to Slurm: sbatch, scontrol, sacct and scancel, each failure a UserError that says why.

Every call has a timeout and none waits for a job: ``submit`` returns once
sbatch has answered. The state of a job comes from ``scontrol show job`` while
the controller remembers it (MinJobAge, 300 s by default, after it ends), then
from ``sacct`` where accounting is configured.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from launch.errors import UserError

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
          "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}
"""States of a job that has not ended: a run with one of these is not submitted again."""
_FIX_CLIENT = ("run trainctl where Slurm's client tools work (a login node), or start the local test "
               "cluster: eval \"$(slurm/cluster.sh start)\"")


@dataclass(frozen=True)
class JobState:
    job_id: str
    state: str
    """Slurm's JobState (PENDING, RUNNING, COMPLETED, FAILED, ...), or UNKNOWN once forgotten."""
    elapsed: str = ""
    restarts: int = 0
    exit_code: str = ""
    reason: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def _run(argv: list[str], *, timeout: float = 60) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        raise UserError(f"{argv[0]}: not found on PATH, so no job was submitted or queried\n  fix: {_FIX_CLIENT}")
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"{' '.join(argv[:2])}: no answer in {timeout:.0f} s (is the controller down?)\n"
                        f"  fix: check `scontrol ping`, then retry") from None


def _failure(argv: list[str], out: subprocess.CompletedProcess) -> UserError:
    message = (out.stderr or out.stdout).strip()
    if "Unable to contact slurm controller" in message or "Connection refused" in message:
        fix = "the Slurm controller is not answering; check `scontrol ping` and retry"
    elif any(m in message for m in ("configuration source", "resolve_ctls_from_dns_srv", "configuration file")):
        fix = "Slurm's client tools find no slurm.conf here: set SLURM_CONF, or " + _FIX_CLIENT
    elif argv[0] == "sbatch":
        fix = "change the request Slurm refused (cluster.partition, cluster.nodes, cluster.time_limit, ...)"
    else:
        fix = "see Slurm's message above"
    return UserError(f"{argv[0]} failed (exit {out.returncode}): {message}\n  fix: {fix}")


def submit(script: Path, *, dependency: str | None = None) -> str:
    """``sbatch --parsable SCRIPT``: the job id, as soon as Slurm has accepted the job."""
    argv = ["sbatch", "--parsable", *([f"--dependency={dependency}"] if dependency else []), str(script)]
    out = _run(argv)
    if out.returncode != 0:
        raise _failure(argv, out)
    return out.stdout.strip().split(";")[0]


def test_only(script: Path) -> str:
    """``sbatch --test-only``: Slurm's estimate of when and where the job would start; queues nothing."""
    argv = ["sbatch", "--test-only", str(script)]
    out = _run(argv)
    if out.returncode != 0:
        raise _failure(argv, out)
    return (out.stderr or out.stdout).strip().removeprefix("sbatch: ")


def cancel(job_ids: list[str]) -> None:
    argv = ["scancel", *job_ids]
    out = _run(argv)
    if out.returncode != 0:
        raise _failure(argv, out)


def states(job_ids: list[str]) -> dict[str, JobState]:
    """job id -> its state; ids Slurm no longer knows are UNKNOWN. An array id gives each of its tasks."""
    found: dict[str, JobState] = {}
    for job_id in job_ids:
        out = _run(["scontrol", "show", "job", "--oneliner", job_id])
        if out.returncode == 0:
            for line in out.stdout.splitlines():
                if line.strip():
                    state = _from_scontrol(line)
                    found[state.job_id] = state
        elif "Invalid job id" not in out.stderr:
            raise _failure(["scontrol"], out)
    missing = [j for j in job_ids if j not in found and not any(k.startswith(f"{j}_") for k in found)]
    found.update(_from_sacct(missing))
    return found


def _from_scontrol(line: str) -> JobState:
    fields = dict(word.split("=", 1) for word in line.split() if "=" in word)
    array_task = fields.get("ArrayTaskId")
    job_id = f"{fields['ArrayJobId']}_{array_task}" if array_task and "ArrayJobId" in fields else fields["JobId"]
    return JobState(job_id=job_id, state=fields.get("JobState", "UNKNOWN"), elapsed=fields.get("RunTime", ""),
                    restarts=int(fields.get("Restarts", "0") or 0), exit_code=fields.get("ExitCode", ""),
                    reason=fields.get("Reason", "None"))


def _from_sacct(job_ids: list[str]) -> dict[str, JobState]:
    """Jobs the controller has forgotten: sacct (or sacct --completion) where Slurm keeps a record, else UNKNOWN."""
    result = {j: JobState(job_id=j, state="UNKNOWN", reason="forgotten by the controller; no accounting")
              for j in job_ids}
    if not job_ids or shutil.which("sacct") is None:
        return result
    argv = ["sacct", "--noheader", "--parsable2", "--allocations", "--format=JobID,State,Elapsed,ExitCode",
            "--jobs", ",".join(job_ids)]
    out = _run(argv)
    if out.returncode != 0:  # no accounting database: the job-completion log, where one is kept
        out = _run([*argv, "--completion"])
    if out.returncode != 0:
        return result
    for line in out.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 4 and parts[0] in result:
            result[parts[0]] = JobState(job_id=parts[0], state=parts[1].split()[0], elapsed=parts[2],
                                        exit_code=parts[3])
    return result
