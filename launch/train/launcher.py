"""``python -m launch.train.launcher TORCHRUN-ARGS``: torchrun, as cluster=local's launch.sh runs it.

torchrun forwards a stop signal (``--signals-to-handle``) to every rank, waits for
them (``--shutdown-timeout``), then raises the signal as an exception whose
traceback reads like a crash, although the ranks stopped as asked and saved a
checkpoint. Here that exception ends the launcher quietly, with 128 + the
signal's number, as a shell reports a command a signal stopped; what the ranks
did is in the run's outcome record, which ``trainctl submit`` reads. A rank that
exits non-zero (diverged, hang, storage, locked, a crash) makes torchrun raise
``ChildFailedError``, whose traceback would hide the one line the rank printed:
here it becomes one line naming the rank and its exit code, and exit 1 (the
job script reads the outcome record, never torchrun's code).

The launcher gets SIGTERM when its parent (``trainctl submit``) dies, so a killed
``trainctl`` still stops the ranks at a checkpoint; and every rank dies with the
launcher (``launch.train.__main__``), so none outlives it.
"""

from __future__ import annotations

import signal
import sys

from launch.train.stop import die_with_parent


def main(argv: list[str]) -> int:
    for sig in _STOPS:  # until torchrun takes them over, before it starts a rank: nothing to stop yet
        signal.signal(sig, _note)
    die_with_parent(signal.SIGTERM)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if _received:
        return 128 + _received[0]
    for sig in _STOPS:
        signal.signal(sig, _quit)
    try:
        torchrun(argv)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        print(f"trainctl: torchrun: rank {rank} exited with code {failure.exitcode} (its own line above says why; "
              "RUN_DIR/outcomes/ records how the job step ended)", file=sys.stderr, flush=True)
        return 1
    return 0


_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)
_received: list[int] = []


def _note(signum: int, _frame) -> None:
    """During the imports: only noted. An exception raised inside an import can be swallowed by a
    library's broad ``except`` (a Ctrl-C then went unseen and the run trained to the end)."""
    _received.append(signum)


def _quit(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
