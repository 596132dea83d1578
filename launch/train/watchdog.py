"""Hangs: a watchdog thread in every rank, and one heartbeat file per node.

A stuck collective (a dead NIC, a rank in an endless loop, a deadlocked data
worker) blocks every rank in C++ where no Python exception can reach it; left
alone, it ends only at the process group's timeout (torch's NCCL default: 10
minutes; DeepSpeed's 30) as a crash with no word of where each rank was.

**Progress.** The loop calls ``beat(step)`` after every step, and ``beat(phase=...)``
at the start of the long phases (building, checkpoint load and save, validation,
the final export): a cheap store of a monotonic time, no I/O. A phase therefore
counts as a hang only when it alone runs past the timeout. Building (imports, the
engine, the process group) is not timed: imports alone from a cold parallel file
system can take minutes at scale, and torchrun's rendezvous timeout and the process
group's init timeout bound it; the clock starts at the first beat after it.

**The watchdog** (``start``): a daemon thread per rank that wakes about once a
second. When no beat came for ``train.hang_timeout_s`` it dumps this rank's Python
stacks (``faulthandler``, every thread) to ``RUN_DIR/hangs/JOBREF.RESTART/rank_R.txt``,
writes the outcome ``hang`` (first writer wins: one record per job step), prints
one line (the rank that wrote the record) and, ``GRACE_S`` later, ends the process
with ``EXIT_HANG`` through ``os._exit``: the main thread is stuck and cannot unwind. A stuck
collective stalls every rank, so every rank's watchdog fires within about a second
and every rank leaves its stacks: the stalled rank shows where it is, its peers
show the collective they wait in. ``kill -USR2 PID`` prints a rank's stacks to its
log at any time, without stopping it.

**Heartbeats.** The local-rank-0 watchdog of each node writes
``RUN_DIR/heartbeats/NODE.json`` (last step, phase, the time of the last progress,
job, restart), throttled to one write per ``HEARTBEAT_S`` while there is progress,
atomically (a temporary file renamed over it): one file per node, not per rank, so
16,384 GPUs make 2,048 small writes every 15 s, not a metadata storm. The time in it
is that of the last progress, not of the write, so ``trainctl status`` can name a
node whose file is older than the timeout as stalled (the watchdog should have
ended it: the node is gone, or its watchdog is off).

**nvidia-resiliency-ext 0.4.1** (the last release with a Python 3.11 wheel; ``pip install
--dry-run`` into this venv would add only pynvml, nvidia-ml-py and defusedxml, no change to
torch 2.13) is not used; tried from a scratch ``--target`` install under this venv:
``fault_tolerance.RankMonitorClient().init_workload_monitoring()`` raises
``RankMonitorClientError: FT_RANK_MONITOR_IPC_SOCKET env variable should be set``: its
heartbeats go to a rank monitor server that only its own launcher ``ft_launcher`` starts, so
it would replace torchrun in launch.sh and the sbatch script (and its restart on a hang kills
the ranks without a stack dump); ``inprocess.Wrapper`` imports, but restarts the training
function inside the process and frees a stuck collective by aborting the NCCL communicators
(``abort.AbortTorchDistributed``), nothing for the gloo groups of these CPU runs, and needs its
own TCP store and a re-entrant training function; ``straggler`` fails to import without CUDA
(``ImportError: libcupti.so.12``). This module does the part that fits torchrun + Slurm
requeue: detect, dump, record, exit.
"""

from __future__ import annotations

import datetime as dt
import faulthandler
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from launch.record import outcome
from launch.record.heartbeats import DIR as HEARTBEAT_DIR
from launch.record.heartbeats import PERIOD_S as HEARTBEAT_S
from launch.record.outcome import Outcome

HANGS_DIR = "hangs"
EXIT_HANG = 8
"""The exit code of a rank its watchdog ended (launch/train/__main__.py lists the others)."""
GRACE_S = 3.0
"""How long a rank whose watchdog fired waits before it exits. Every rank's last beat follows the same
end-of-step all-reduce, so their watchdogs fire within about one poll (1 s) of each other; an exit
before a peer's fires would break the peer's collective (gloo: connection reset) and it would end in
a traceback without its stacks."""
STALL_KNOB = "TRAINCTL_FAULT_STALL_AT_STEP"
"""Test-only: ``N`` (rank 1) or ``RANK:N``: that rank sleeps forever once it has finished step N."""

_last = time.monotonic()
_step: int | None = None
_phase = "starting"
_stall_at: tuple[int, int] | None = None  # (rank, step) from STALL_KNOB, read once by start()
_rank = 0
_dog: _Watchdog | None = None


def beat(step: int | None = None, phase: str = "training") -> None:
    """Note progress: ``step`` finished, or ``phase`` begins. Called every step: no I/O, no locks."""
    global _last, _step, _phase
    _last = time.monotonic()
    _phase = phase
    if step is not None:
        _step = step
        if _stall_at is not None and _stall_at == (_rank, step):
            _stalled_by_test_knob()


def start(run_dir: Path, timeout_s: float, env=os.environ) -> None:
    """Start this rank's watchdog (``timeout_s`` 0: none) and, on a node's local rank 0, its heartbeats."""
    global _dog, _stall_at, _rank
    rank, local_rank = int(env.get("RANK") or 0), int(env.get("LOCAL_RANK") or 0)
    _rank = rank
    _stall_at = stall_knob(env.get(STALL_KNOB, ""))
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # `kill -USR2 PID`: this rank's stacks to its log
    beat(phase="building")
    if timeout_s > 0 or local_rank == 0:
        _dog = _Watchdog(run_dir, timeout_s, rank=rank, heartbeats=local_rank == 0, env=env)
        _dog.start()


def stop() -> None:
    """End the watchdog (the job step is ending on its own) after a last heartbeat."""
    global _dog
    dog, _dog = _dog, None
    if dog is not None:
        dog.finish()


def stall_knob(text: str) -> tuple[int, int] | None:
    """``TRAINCTL_FAULT_STALL_AT_STEP``: ``N`` or ``RANK:N`` -> (rank, step); None when unset."""
    if not text.strip():
        return None
    rank, _, step = text.strip().rpartition(":")
    try:
        return int(rank or 1), int(step)
    except ValueError:
        raise SystemExit(f"trainctl: {STALL_KNOB}={text!r}: not N or RANK:N (a test-only fault knob)") from None


def _stalled_by_test_knob() -> None:
    """What a stalled rank looks like: busy with nothing, forever (its stack names this function)."""
    while True:
        time.sleep(3600)


class _Watchdog(threading.Thread):
    def __init__(self, run_dir: Path, timeout_s: float, *, rank: int, heartbeats: bool, env) -> None:
        super().__init__(name="trainctl-watchdog", daemon=True)
        self.run_dir, self.timeout_s, self.rank, self.heartbeats = run_dir, timeout_s, rank, heartbeats
        self.key, self.node = outcome.step_key(env), outcome.node_name(env)
        self.job = outcome.job_ref(env)
        self.restart = int(env.get("SLURM_RESTART_COUNT") or 0) if self.job != "local" else 0
        self.done = threading.Event()
        self.written: tuple | None = None  # (beat time, phase) of the last heartbeat written
        self.written_at = -HEARTBEAT_S

    def run(self) -> None:
        poll = min(1.0, self.timeout_s / 10) if self.timeout_s > 0 else 1.0
        while not self.done.wait(poll):
            last, phase, now = _last, _phase, time.monotonic()
            if self.heartbeats and (last, phase) != self.written and (
                    now - self.written_at >= HEARTBEAT_S or (self.written and phase != self.written[1])):
                self.heartbeat(last, phase, now)
            if self.timeout_s > 0 and phase != "building" and now - last > self.timeout_s:
                self.fire(now - last, phase)

    def finish(self) -> None:
        self.done.set()
        self.join(timeout=5)
        if self.heartbeats:
            self.heartbeat(_last, "ended", time.monotonic())

    def heartbeat(self, last: float, phase: str, now: float) -> None:
        """RUN_DIR/heartbeats/NODE.json, replaced whole; a failed write is skipped (never a reason to stop)."""
        folder = self.run_dir / HEARTBEAT_DIR
        final = folder / f"{self.node}.json"
        tmp = folder / f".{final.name}.{os.getpid()}"
        progress = time.time() - (now - last)
        record = {"node": self.node, "job": self.job, "restart": self.restart, "rank": self.rank, "step": _step,
                  "phase": phase, "time": dt.datetime.fromtimestamp(progress, dt.timezone.utc).isoformat(
                      timespec="seconds"), "unix": round(progress, 3), "hang_timeout_s": self.timeout_s}
        try:
            folder.mkdir(exist_ok=True)
            tmp.write_text(json.dumps(record) + "\n")
            os.replace(tmp, final)
        except OSError:
            return
        self.written, self.written_at = (last, phase), now

    def fire(self, idle: float, phase: str) -> None:
        folder = self.run_dir / HANGS_DIR / self.key
        where = f"step {_step}" if _step is not None else "the start"
        cause = (f"no training progress for {idle:.0f} s (train.hang_timeout_s={self.timeout_s:g}) after {where} "
                 f"({phase}); every rank's Python stacks are in {folder}")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"rank_{self.rank}.txt", "w") as f:
                f.write(f"rank {self.rank} on {self.node} (pid {os.getpid()}): {cause}\n\n")
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
        except OSError:
            pass
        if outcome.write(self.run_dir, Outcome.hang, f"hang on rank {self.rank}: {cause}", step=_step):
            print(f"trainctl: hang on rank {self.rank} ({self.node}): {cause}; ending the job step with the "
                  "outcome hang (a Slurm job is requeued as a crash)", file=sys.stderr, flush=True)
        time.sleep(GRACE_S)  # the peers' watchdogs fire too before this exit breaks their collective
        os._exit(EXIT_HANG)
