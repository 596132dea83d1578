"""How each job step ended: ``RUN_DIR/outcomes/JOBREF.RESTART.json``, one record per job step.

torchrun exits 1 whatever code a rank returned, so the job script cannot decide
from exit codes. The trainer entrypoint (``launch.train.__main__``) writes what
happened here; the job script (slurm/job.sbatch.j2, ``read_outcome``) reads it
after the step and decides: stop, requeue, or count a crash; ``trainctl status``
shows the last one.

**One file per job step, the first writer wins.** The file is written whole
beside its final name and ``os.link``-ed into place: a link fails when the name
exists, so when many ranks fail at once (every rank finds the same missing data;
a crash brings its peers down) exactly one record lands, the first, and nothing
is ever half-written under the final name. ``done``, ``stopped`` and ``diverged`` come from
rank 0 only; ``config``, ``node``, ``storage``, ``crash`` and ``hang`` from whichever rank failed first.

**One line, ``outcome`` first, ``cause`` last**, so the script reads it with
``sed`` and does not need a Python with trainctl beside it (in container mode the
batch shell runs outside the image).
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from launch.errors import UserError

DIR = "outcomes"


class Outcome(str, enum.Enum):
    """What the job script does with each: the README's table "Outcomes the job script acts on"."""

    done = "done"
    """Trained to the end, final export written: stop."""
    config = "config"
    """A configuration or input error found on the node: stop, no requeue (a requeue would fail the same way)."""
    stopped = "stopped"
    """A stop signal handled, checkpoint written: requeue after SIGUSR1, stop after SIGTERM."""
    node = "node"
    """This node cannot train (no usable GPU, a failed health check): requeue without it."""
    storage = "storage"
    """A checkpoint save ran out of space or quota; the partial save removed, older checkpoints intact: stop,
    no requeue (the next save would fail the same way, an interval of steps later, until space is freed)."""
    crash = "crash"
    """An unexpected exception: requeue within the crash budget (``cluster.max_crash_requeues``)."""
    diverged = "diverged"
    """Training diverged (non-finite steps or loss spikes past train.guard's bounds, or non-finite weights
    before a save): stop, no requeue (replaying the same data diverges again; a human must look)."""
    hang = "hang"
    """No training progress for ``train.hang_timeout_s`` (``launch.train.watchdog``; every rank's stacks in
    RUN_DIR/hangs/): requeue as a crash (within the crash budget). No node is left out: a stuck collective
    stalls every rank, so the rank whose watchdog fired first (the record's) is not the one to blame."""
    locked = "locked"
    """Another live job holds the run directory's lock record (``launch.record.lock``): stop, no requeue
    (two jobs would write one run)."""


@dataclass(frozen=True)
class Record:
    outcome: Outcome
    job: str
    """SLURM job id, ``ARRAYID_TASK`` for a job-array task, or ``local``."""
    restart: int
    """SLURM_RESTART_COUNT: how many times the job had been requeued when this step ran."""
    node: str
    rank: int | None
    step: int | None
    """The last completed training step, where known."""
    time: str
    cause: str
    """One line: what happened."""


def job_ref(env=os.environ) -> str:
    """This job's reference as the job script spells it (``$JOB_REF``), or ``local``."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or "local"


def node_name(env=os.environ) -> str:
    """Slurm's name for this node (``SLURMD_NODENAME``), else the host name.

    The job script excludes a node by this name (``scontrol update ExcNodeList``), and
    host names need not be Slurm's: the local test cluster's two nodes share one host.
    """
    return env.get("SLURMD_NODENAME") or socket.gethostname()


def step_key(env=os.environ) -> str:
    """The record's file stem for this job step: ``JOBREF.RESTART``.

    A local run has no job id; torchrun's run id (a new uuid per ``--standalone``
    launch, the same on every rank of it) keeps two local runs in one directory apart.
    """
    ref = job_ref(env)
    if ref == "local":
        run_id = re.sub(r"[^A-Za-z0-9_-]", "", env.get("TORCHELASTIC_RUN_ID", ""))[:36] or str(os.getppid())
        return f"local-{run_id}.0"
    return f"{ref}.{int(env.get('SLURM_RESTART_COUNT') or 0)}"


def write(run_dir: Path, outcome: Outcome, cause: str, *, step: int | None = None, env=os.environ) -> bool:
    """Record this job step's outcome unless a record of it exists; True if this call wrote it.

    Never raises: a record that cannot be written (a full disk) must not hide the
    error being recorded; the script then takes the crash path (no record).
    """
    folder = run_dir / DIR
    final = folder / f"{step_key(env)}.json"
    if final.exists():  # another rank was first: one stat instead of a write per rank
        return False
    rank = env.get("RANK")
    ref = job_ref(env)
    record = {"outcome": Outcome(outcome).value, "job": ref,
              "restart": int(env.get("SLURM_RESTART_COUNT") or 0) if ref != "local" else 0,
              "node": node_name(env), "rank": int(rank) if rank and rank.isdigit() else None,
              "step": step, "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "cause": first_line(cause)}
    tmp = folder / f".{final.name}.{socket.gethostname()}.{os.getpid()}"
    try:
        folder.mkdir(exist_ok=True)
        tmp.write_text(json.dumps(record) + "\n")
        os.link(tmp, final)
        return True
    except OSError:  # FileExistsError: another rank won the race; or no place to write it
        return False
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def first_line(text: str, limit: int = 300) -> str:
    """The first non-empty line of ``text``, at most ``limit`` characters."""
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def read(path: Path) -> Record:
    """One outcome record; ``UserError`` naming the file when it is damaged."""
    try:
        data = json.loads(path.read_text())
        return Record(outcome=Outcome(data["outcome"]), job=str(data["job"]), restart=int(data["restart"]),
                      node=str(data["node"]), rank=data.get("rank"), step=data.get("step"), time=str(data["time"]),
                      cause=str(data["cause"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not an outcome record trainctl wrote ({type(exc).__name__}: {exc})\n"
                        "  fix: remove it; the job script treats a job step without a record as a crash") from None


def last(run_dir: Path, job_id: str | None) -> Path | None:
    """The record of ``job_id``'s latest job step (its highest restart); a local job's: the newest local one."""
    try:
        names = os.listdir(run_dir / DIR)
    except OSError:
        return None
    if job_id is None:
        return None
    if job_id.startswith("local"):
        local = [run_dir / DIR / n for n in names if n.startswith("local-") and n.endswith(".json")]
        return max(local, key=lambda p: p.stat().st_mtime, default=None)
    restarts = [int(m.group(1)) for n in names if (m := re.fullmatch(rf"{re.escape(job_id)}\.(\d+)\.json", n))]
    return run_dir / DIR / f"{job_id}.{max(restarts)}.json" if restarts else None
