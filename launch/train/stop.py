"""Stop requests: SIGUSR1 (the time limit is near) and SIGTERM (preemption, scancel).

A signal may reach some ranks and not others, or reach them during different
steps. So a rank only notes it here; at the end of each step every rank
all-reduces its flag (``agree``) and all stop after the same step, which is
where a trainer writes its checkpoint. The sbatch script, which saw the signal
first, decides to requeue (slurm/job.sbatch.j2).
"""

from __future__ import annotations

import signal

_received: list[str] = []


def install() -> None:
    """Note SIGUSR1 and SIGTERM instead of dying on them."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: _received.append(signal.Signals(signum).name))


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
