"""One run, one writer: the run directory's two locks.

**On this machine: ``RUN_DIR/.lock``, an ``flock``** (``hold``). ``trainctl submit``
takes it before it checks and writes the run, and keeps it until ``sbatch`` has
answered (Slurm) or until the local run has ended (cluster=local: the launcher
inherits the open file, so the lock lasts as long as torchrun does even if
``trainctl`` itself is killed). A second ``submit`` of the same run is refused at
once, naming the holder. The kernel drops an ``flock`` when its holder dies, so
a lock is never left behind.

**On the cluster: ``RUN_DIR/run.lock``, a lock record** (``take_record``). Parallel
file systems often lack a trustworthy ``flock`` (Lustre mounted without ``-o
flock``; NFS, whose server may keep a dead client's lock), so the job's rank 0
holds a record instead: job id, node, pid, time, and a heartbeat (the file's
mtime, touched every ``HEARTBEAT_S``). A newer job takes it over only when the
holder is gone: its heartbeat is older than ``STALE_S``, or Slurm says its job no
longer runs, or (a local run on this host) its process is gone. A requeued job
(the same job id) keeps its own record. The record is created with ``os.link``
(atomic on NFS and Lustre, unlike ``O_EXCL`` on old NFS), and a takeover happens
under a short-lived ``mkdir`` mutex, so two jobs that find the same stale record
cannot both take it.

No torch here: ``submit`` runs on login nodes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from launch.errors import UserError

FLOCK_NAME = ".lock"
RECORD_NAME = "run.lock"
HEARTBEAT_S = 30.0
"""How often the holder touches its record."""
STALE_S = 300.0
"""A record whose heartbeat is older than this is taken over (ten missed heartbeats: a stalled
file-system write is not a dead job)."""
_TAKEOVER_MUTEX_S = 60.0
"""A takeover mutex older than this was left by a job that died while taking over."""


# --- this machine: flock -------------------------------------------------------------------

@contextlib.contextmanager
def hold(run_dir: Path, what: str):
    """Hold ``RUN_DIR/.lock`` for the block; yields its file descriptor (for a launcher to inherit).

    ``what`` says what the holder is doing (``trainctl submit``), for the refusal a second one gets.
    A file system without ``flock`` (ENOLCK, EOPNOTSUPP) yields None: the job's record still guards.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / FLOCK_NAME
    fd = _flock(run_dir, path)
    if fd is None:
        yield None
        return
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now(), "what": what}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield fd
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding it: a newcomer that opened the old file retries (_same_file)
        os.close(fd)


def _flock(run_dir: Path, path: Path) -> int | None:
    """An open descriptor of ``path`` holding its exclusive flock; None where the file system has no flock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _wait_for_holder(fd)
            os.close(fd)
            raise UserError(refusal(run_dir, holder)) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return None
            raise
        if _same_file(fd, path):
            return fd
        os.close(fd)  # the holder removed the file between our open and our flock: lock the new one


def note_job(fd: int | None, job_id: str) -> None:
    """Add the job's id to the holder's record (a local run's ``local:PID``)."""
    if fd is None:
        return
    holder = _read_holder(fd) or {}
    holder["job"] = job_id
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)


def refusal(run_dir: Path, holder: dict | None) -> str:
    who = (f"{holder.get('what', 'a trainctl command')} (pid {holder.get('pid')} on {holder.get('host')}"
           f"{', job ' + holder['job'] if holder.get('job') else ''}, since {holder.get('since')})"
           if holder else "another trainctl command")
    return (f"{run_dir}: in use by {who}; two writers in one run directory would overwrite each other's "
            f"checkpoints\n  fix: wait for it to end, stop it (Ctrl-C in its terminal, or `trainctl cancel "
            f"{run_dir}`), or choose another name=")


def _read_holder(fd: int) -> dict | None:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return None


def _wait_for_holder(fd: int, wait_s: float = 1.0) -> dict | None:
    """The holder's record; a holder that has just taken the lock writes it a moment later, so wait briefly."""
    deadline = time.monotonic() + wait_s
    while (holder := _read_holder(fd)) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return holder


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


# --- the cluster: a lock record with a heartbeat -------------------------------------------

@dataclass(frozen=True)
class Holder:
    job: str
    """SLURM job id (``ARRAYID_TASK`` for an array task), or ``local``."""
    node: str
    pid: int
    since: str
    heartbeat_age_s: float
    """Seconds since the holder last touched the record."""

    def describe(self) -> str:
        return (f"job {self.job} (node {self.node}, pid {self.pid}, since {self.since}, "
                f"heartbeat {self.heartbeat_age_s:.0f} s ago)")


class Held(Exception):
    """Another live job holds the run directory's record."""

    def __init__(self, holder: Holder) -> None:
        self.holder = holder
        super().__init__(holder.describe())


def read_record(run_dir: Path) -> Holder | None:
    """The record's holder, or None where there is no (readable) record."""
    path = run_dir / RECORD_NAME
    try:
        data = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
        return Holder(job=str(data["job"]), node=str(data["node"]), pid=int(data["pid"]),
                      since=str(data["since"]), heartbeat_age_s=max(0.0, age))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def gone_why(holder: Holder, run_dir: Path, *, stale_s: float = STALE_S) -> str | None:
    """Why the holder no longer holds the run (stale heartbeat, job not running, process gone); None: it does."""
    if holder.heartbeat_age_s > stale_s:
        return f"its heartbeat is {holder.heartbeat_age_s:.0f} s old (stale after {stale_s:.0f} s)"
    if holder.job == "local":
        if holder.node == socket.gethostname() and not _process_runs(holder.pid, run_dir):
            return f"its process {holder.pid} is gone"
        return None
    state = _slurm_state(holder.job)
    if state is not None and state not in ("RUNNING", "PENDING", "CONFIGURING", "COMPLETING", "REQUEUED",
                                           "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"):
        return f"Slurm says its job is {state or 'no longer known'}"
    return None


def take_record(run_dir: Path, job: str, *, stale_s: float = STALE_S) -> str:
    """Take ``RUN_DIR/run.lock`` for this job; returns what happened (one line). Raises ``Held``."""
    path = run_dir / RECORD_NAME
    mine = {"job": job, "node": _node(), "pid": os.getpid(), "since": _now()}
    for _ in range(3):  # a record released or replaced while we looked: look again
        if _link_new(path, mine):
            return f"took {path} for job {job}"
        holder = read_record(run_dir)
        if holder is None:
            continue
        if job != "local" and holder.job == job:
            _replace(path, mine)  # this job, requeued (or a restarted step): its own record
            return f"kept {path}: it is this job's ({job}), requeued or restarted"
        why = gone_why(holder, run_dir, stale_s=stale_s)
        if why is None:
            raise Held(holder)
        if _take_over(run_dir, holder, mine):
            return f"took over {path} from {holder.describe()}: {why}"
    holder = read_record(run_dir)
    if holder is not None:
        raise Held(holder)
    raise OSError(errno.EAGAIN, f"{path}: could not take the lock record (it kept changing)")


def release_record(run_dir: Path, job: str) -> None:
    """Remove the record if it is still this process's."""
    holder = read_record(run_dir)
    if holder is not None and holder.job == job and holder.pid == os.getpid() and holder.node == _node():
        with contextlib.suppress(OSError):
            (run_dir / RECORD_NAME).unlink()


def heartbeat(run_dir: Path, job: str, interval_s: float = HEARTBEAT_S) -> threading.Event:
    """Touch the record every ``interval_s`` in a daemon thread while it is this process's; set the event to stop."""
    done = threading.Event()
    path = run_dir / RECORD_NAME

    def beat() -> None:
        while not done.wait(interval_s):
            holder = read_record(run_dir)
            if holder is None or holder.job != job or holder.pid != os.getpid():
                return  # taken over (our heartbeat went stale) or released: touch nothing of another's
            with contextlib.suppress(OSError):
                os.utime(path)

    threading.Thread(target=beat, name="trainctl-lock-heartbeat", daemon=True).start()
    return done


def _link_new(path: Path, record: dict) -> bool:
    """Create ``path`` holding ``record`` only if it does not exist (link: atomic on NFS and Lustre)."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}")
    tmp.write_text(json.dumps(record) + "\n")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _replace(path: Path, record: dict) -> None:
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)


def _take_over(run_dir: Path, stale: Holder, mine: dict) -> bool:
    """Replace a stale record under a mutex directory; False if another job changed it first."""
    mutex = run_dir / f".{RECORD_NAME}.takeover"
    try:
        mutex.mkdir()
    except FileExistsError:
        with contextlib.suppress(OSError):
            if time.time() - mutex.stat().st_mtime > _TAKEOVER_MUTEX_S:
                shutil.rmtree(mutex)  # left by a job that died taking over
        return False
    try:
        now = read_record(run_dir)
        if now is None or (now.job, now.node, now.pid, now.since) != (stale.job, stale.node, stale.pid, stale.since):
            return False  # released, or another job took it over: look again
        _replace(run_dir / RECORD_NAME, mine)
        return True
    finally:
        with contextlib.suppress(OSError):
            mutex.rmdir()


def _process_runs(pid: int, run_dir: Path) -> bool:
    """Whether ``pid`` runs and its command line names this run directory (a reused pid does not)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return any(a and os.path.realpath(os.path.join(cwd, a)) == os.path.realpath(run_dir) for a in args)


def _slurm_state(job: str) -> str | None:
    """Slurm's state of ``job`` ("" when Slurm no longer knows it), or None where squeue cannot answer."""
    if shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return "" if "Invalid job id" in out.stderr else None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""


def _node() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def claim(run_dir: Path, env=os.environ) -> str | None:
    """Rank 0 of a training job takes the run's record: None, or one line saying which live job holds it.

    The other ranks take nothing: when rank 0 refuses, torchrun ends them with it.
    """
    from launch.record.outcome import job_ref

    if env.get("RANK", "0") != "0":
        return None
    job = job_ref(env)
    try:
        said = take_record(run_dir, job)
    except Held as exc:
        return (f"{run_dir} is held by {exc.holder.describe()}; this job stops without training, so that one run "
                f"has one writer (fix: wait for that job or cancel it; a dead holder's record is taken over once "
                f"its job is gone or its heartbeat is {STALE_S:.0f} s old)")
    except OSError as exc:
        print(f"trainctl: could not write the lock record {run_dir / RECORD_NAME} ({exc}); training without it",
              file=sys.stderr, flush=True)
        return None
    if not said.startswith("took " + str(run_dir / RECORD_NAME)):
        print(f"trainctl: {said}", file=sys.stderr, flush=True)  # a takeover, or this job's own record
    heartbeat(run_dir, job)
    return None


def release(run_dir: Path, env=os.environ) -> None:
    """Rank 0's end of training: its record goes (a requeued job takes it again)."""
    from launch.record.outcome import job_ref

    if env.get("RANK", "0") == "0":
        release_record(run_dir, job_ref(env))
