"""cluster=local: ``submit`` runs RUN_DIR/launch.sh (torchrun on this machine) in the foreground.

The run is recorded in job.json as ``local:PID`` (the launcher's pid) while it
runs, with its exit code and outcome once it ends. A record whose process is
gone (killed, machine rebooted) does not block a new submission: a pid counts
as this run only while it is alive and its command line names this run's
directory (``jobs.local_state``).

**Signals.** The launcher runs in a process group of its own, so every signal
reaches it once, by one path (torchrun aborts its orderly stop on a second one):

- Ctrl-C (SIGINT to this terminal's foreground group, i.e. ``trainctl``): passed
  on to the launcher, which passes it to every rank; they finish the step and
  save a checkpoint, and one line says where it is and how to resume. A second
  Ctrl-C kills the launcher at once (its ranks die with it: no checkpoint).
- SIGTERM or SIGHUP to ``trainctl``: passed on as SIGTERM, the same orderly stop.
- ``trainctl`` killed outright (SIGKILL): the launcher gets SIGTERM from the
  kernel (its parent-death signal, ``launch.train.launcher``), the same stop.
- A signal sent to the launcher itself (``trainctl cancel``: SIGTERM; SIGUSR1):
  torchrun forwards it; ``trainctl`` reports the stop the same way.

The launcher inherits ``submit``'s lock on the run directory (``launch.record.lock``),
so a second ``submit`` is refused until the launcher and its ranks are gone.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from launch.errors import UserError
from launch.record import jobs, outcome
from launch.record.checkpoints import find_resume
from launch.record.outcome import Outcome

_FORWARDED = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM}
"""A signal ``trainctl`` gets -> the one its launcher gets (the first time; the second kills it)."""


def submit(run_dir: Path, checkpoint_dir: Path, lock_fd: int | None = None) -> str:
    """Run launch.sh, recorded in job.json; returns its id once it has finished.

    Ends with ``SystemExit(128 + signal)`` after a stop (a checkpoint saved, or a second
    Ctrl-C), as a shell reports a command a signal stopped; ``UserError`` if the run failed.
    """
    script = run_dir / "launch.sh"
    started = time.time()
    got: list[int] = []
    proc: subprocess.Popen | None = None

    def on_signal(signum: int, _frame) -> None:
        got.append(signum)
        if proc is None or proc.returncode is not None:
            return
        if len(got) == 1:
            _kill(proc.pid, _FORWARDED[signum])
            print(f"trainctl: {_name(signum)}: the ranks finish this step and save a checkpoint "
                  "(Ctrl-C again stops at once, without one)", file=sys.stderr, flush=True)
        elif len(got) == 2:
            _kill(proc.pid, signal.SIGKILL)  # each rank dies with its launcher (parent-death signal)

    previous = {sig: signal.signal(sig, on_signal) for sig in _FORWARDED}
    try:
        proc = subprocess.Popen(["bash", str(script)], stdin=subprocess.DEVNULL, process_group=0,
                                pass_fds=() if lock_fd is None else (lock_fd,))
        job_id = f"{jobs.LOCAL_PREFIX}{proc.pid}"
        jobs.record_submission(run_dir, job_id, script, scheduler="local")
        _note_job(lock_fd, job_id)
        print(f"started {job_id} in the foreground: {run_dir} (Ctrl-C stops it at a checkpoint; the same command "
              "resumes it)", flush=True)
        if got:  # a signal before the launcher had a pid: pass it on now
            _kill(proc.pid, _FORWARDED[got[0]])
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    ended = _outcome(run_dir, started)
    jobs.record_exit(run_dir, job_id, code, outcome=ended.outcome.value if ended else None)
    _report(job_id, run_dir, checkpoint_dir, code, got, ended)
    print(f"finished {job_id}: {run_dir}")
    return job_id


def _report(job_id: str, run_dir: Path, checkpoint_dir: Path, code: int, got: list[int],
            ended: outcome.Record | None) -> None:
    """One line for a stopped or killed run, ending trainctl with 128 + the signal; UserError for a failed one."""
    resume = f"resume: {_command(run_dir)}"
    if ended is not None and ended.outcome == Outcome.stopped:
        sig = got[0] if got else code - 128 if code > 128 else signal.SIGTERM
        print(f"stopped {job_id} by {_name(sig)} at step {ended.step}; checkpoint {find_resume(checkpoint_dir)}; "
              f"{resume}", flush=True)
        raise SystemExit(128 + sig)
    if len(got) == 1 and code != 0 and (ended is None or ended.outcome == Outcome.crash):  # before any rank could save
        print(f"stopped {job_id} by {_name(got[0])} during start-up, before a checkpoint; "
              f"{_latest(checkpoint_dir)}; {resume}", flush=True)
        raise SystemExit(128 + got[0])
    if code < 0:  # the launcher was killed: by a second Ctrl-C (trainctl did it), or from outside
        sig = got[1] if len(got) > 1 else -code
        why = f"a second {_name(sig)}" if len(got) > 1 else f"{_name(sig)} to its launcher"
        print(f"stopped {job_id} at once by {why}, without a new checkpoint (its ranks died with the launcher); "
              f"{_latest(checkpoint_dir)}; {resume}", flush=True)
        raise SystemExit(128 + (got[0] if got else sig))
    if code != 0:
        what = f" ({ended.outcome.value}: {ended.cause})" if ended else ""
        raise UserError(f"{run_dir}: the local run ended with exit code {code}{what}; its output is above\n"
                        "  fix: correct what it reports, then run the same command again (it resumes)")


def cancel(job_id: str) -> None:
    """Stop a running local job (``trainctl cancel``): SIGTERM to its launcher's process group, which
    torchrun passes to every rank; they save a checkpoint and end, and its ``trainctl`` says how to resume."""
    try:
        os.killpg(int(job_id.removeprefix(jobs.LOCAL_PREFIX)), signal.SIGTERM)
    except ProcessLookupError:  # it has just ended
        pass


def _latest(checkpoint_dir: Path) -> str:
    latest = find_resume(checkpoint_dir)
    return f"the latest is {latest}" if latest else "no checkpoint yet"


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # it has just ended
        pass


def _outcome(run_dir: Path, since: float) -> outcome.Record | None:
    """This launch's outcome record: the newest local one written since it started."""
    path = outcome.last(run_dir, "local")
    if path is None or path.stat().st_mtime < since - 1:
        return None
    try:
        return outcome.read(path)
    except UserError:
        return None


def _note_job(lock_fd: int | None, job_id: str) -> None:
    from launch.record.lock import note_job

    note_job(lock_fd, job_id)


def _command(run_dir: Path) -> str:
    """The command that wrote this run (meta.json): running it again resumes from the latest checkpoint."""
    try:
        return json.loads((run_dir / "meta.json").read_text())["command"]
    except (OSError, ValueError, KeyError):
        return f"trainctl submit (with the same overrides; run directory {shlex.quote(str(run_dir))})"


def _name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
