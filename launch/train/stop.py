"""Stop requests: SIGUSR1 (the time limit is near), SIGTERM (preemption, scancel, ``trainctl cancel``)
and SIGINT (Ctrl-C on a local run, which torchrun forwards to the ranks).

A signal may reach some ranks and not others, or reach them during different
steps. So a rank only notes it here; at the end of each step every rank
all-reduces its flag (``agree``) and all stop after the same step, which is
where a trainer writes its checkpoint. The sbatch script, which saw the signal
first, decides to requeue (slurm/job.sbatch.j2); on cluster=local ``trainctl
submit`` prints where the checkpoint is and how to resume.

A second SIGINT means "stop now": the rank dies of it at once, without a checkpoint.

``die_with_parent`` ties a process to its parent (Linux ``PR_SET_PDEATHSIG``):
torchrun starts each rank in a session of its own, so killing the launcher's
process group would otherwise leave the ranks training on, unseen.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_received: list[str] = []
_PR_SET_PDEATHSIG = 1


def install() -> None:
    """Note SIGUSR1, SIGTERM and a first SIGINT instead of dying on them."""
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _note)


def _note(signum: int, _frame) -> None:
    name = signal.Signals(signum).name
    if signum == signal.SIGINT and "SIGINT" in _received:  # Ctrl-C twice: stop at once, as Python would
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    _received.append(name)


def requested() -> str | None:
    """The first stop signal this rank received, or None."""
    return _received[0] if _received else None


def agree(group=None) -> bool:
    """True on every rank when any rank received a stop signal (one all-reduce)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1.0 if _received else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


def die_with_parent(sig: signal.Signals) -> bool:
    """Have the kernel send ``sig`` to this process when its parent dies; False where it cannot (not Linux).

    Kept across exec. A parent that died before the call is caught too: the process has a
    new parent by then, and ends itself with ``sig``.
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True
