"""``python -m launch.train RUN_DIR``: the entrypoint torchrun starts on every rank.

Reads the run record (``launch.record.read``: ``config.yaml`` typed and derived,
``plan.json`` typed), then runs the allocation check (``train.rank_check_s > 0``)
or trains: ``launch.train.preflight`` (no torch yet), the backend's ``TrainModule``
(``preflight.ENGINES``) inside the skeleton's ``Trainer`` (``launch.train.loop``).

Exit codes: 0 done or stopped (checkpoint saved); 2 a user error found on the
node (a damaged record, missing data, a changed config on resume, a private API an
installed engine lacks; checkpoints of which none verifies; a checkpoint directory that cannot
be written); 3 not built; 4 a GPU profile on a node without a usable GPU, or the node the rank
check found below its bus-bandwidth floor; 5 (rank check) another node was below it, and its
ranks write the record; 6 (``launch.train.guard.EXIT_DIVERGED``) training diverged: too many
non-finite steps or loss spikes, or a non-finite weight found before a save (no checkpoint or
export was written with it); 7 a checkpoint save ran out of space or quota (``storage``); 8 no
progress for ``train.hang_timeout_s`` (``launch.train.watchdog``: stacks dumped, outcome hang,
by the first rank whose watchdog fired); 9 another live job holds the run directory
(``launch.record.lock``: rank 0 holds ``RUN_DIR/run.lock`` while it trains).
torchrun turns all of them into 1, so the job script reads the outcome record instead
(``launch.record.outcome``), written here for every engine: done, stopped or diverged (6) by rank 0,
config (2, 3), node (4), storage (7), hang (8), locked (9) or crash (an exception, which still
propagates with its traceback)
by the first rank that fails; nothing for 5.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from launch.errors import UserError
from launch.record import lock, outcome
from launch.record.checkpoints import StorageFull
from launch.record.outcome import Outcome
from launch.record.read import read_config, read_plan
from launch.train import preflight, stop, watchdog
from launch.train.guard import EXIT_DIVERGED, Diverged
from launch.train.metrics import err

ENGINE_NOTICES = (
    r"Transformer Engine and Apex are not installed", r"Apex is not installed", r"full scope is deprecated",
    r"`torch\.distributed\.\w+` is deprecated", r"`load_state_dict` is deprecated", r"Please use DTensor instead",
)
"""Notices megatron-core 0.16, DeepSpeed 0.19 and torch 2.13 print on every rank, some once per call
(thousands per run): none of them is about this run."""


@dataclass(frozen=True)
class Ending:
    code: int
    outcome: Outcome | None
    """None: another rank records this job step's outcome."""
    cause: str
    step: int | None = None


EXIT_LOCKED = 9
EXIT_OUTCOME = {preflight.EXIT_USER: Outcome.config, preflight.EXIT_NOT_BUILT: Outcome.config,
                preflight.EXIT_NO_DEVICE: Outcome.node, EXIT_LOCKED: Outcome.locked}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m launch.train RUN_DIR", file=sys.stderr)
        return preflight.EXIT_USER
    run_dir = Path(argv[0]).absolute()
    stop.die_with_parent(signal.SIGKILL)  # torchrun starts each rank in its own session: no rank outlives it
    stop.install()  # from the start: a stop during start-up stops after the first step, not with a traceback
    seen = SimpleNamespace(trainer=None)  # _run puts its Trainer here: a crash record names the step it reached
    try:
        ending = _run(run_dir, seen)
    except Diverged as exc:  # every rank together (an agreed verdict); rank 0 records it
        ending = Ending(EXIT_DIVERGED, Outcome.diverged, str(exc.cause), exc.step)
        err(f"training diverged: {exc.cause}; stopped, nothing saved after it (outcome diverged, not requeued)")
    except UserError as exc:
        ending = Ending(preflight.EXIT_USER, Outcome.config, "\n".join(exc.problems), _step(seen))
        err(ending.cause)
    except StorageFull as exc:  # every rank: the save agreed on it; the record's first writer wins
        ending = Ending(preflight.EXIT_STORAGE, Outcome.storage, str(exc), _step(seen))
        err(ending.cause)
    except (Exception, KeyboardInterrupt) as exc:  # a crash: recorded, then the traceback goes to the log
        outcome.write(run_dir, Outcome.crash, f"{type(exc).__name__}: {outcome.first_line(str(exc))}",
                      step=_step(seen))
        raise
    finally:
        watchdog.stop()
        lock.release(run_dir)
    if ending.outcome is None:
        return ending.code
    if ending.outcome in (Outcome.done, Outcome.stopped, Outcome.diverged) and os.environ.get("RANK", "0") != "0":
        return ending.code  # rank 0 speaks for a run that ended together
    outcome.write(run_dir, ending.outcome, ending.cause, step=ending.step)
    return ending.code


def _step(seen: SimpleNamespace) -> int | None:
    return seen.trainer.step if seen.trainer is not None else None


def _problem(code: int, problem: str) -> Ending:
    err(problem)
    return Ending(code, EXIT_OUTCOME[code], problem)


def _run(run_dir: Path, seen: SimpleNamespace) -> Ending:
    record, plan = read_config(run_dir), read_plan(run_dir)
    cfg = record.cfg
    problem, code = preflight.device_problem(cfg)
    if problem:
        return _problem(code, problem)
    if cfg.train.rank_check_s > 0:
        from launch.train import rankcheck

        code = rankcheck.rank_check(cfg, plan)
        if code == rankcheck.EXIT_SLOW_NODE:  # the node to exclude: this rank's, so this rank writes the record
            return Ending(code, Outcome.node, "the rank check found this node's all-reduce bus bandwidth below "
                                              "train.rank_check_min_busbw_gbps (its figures are in the job's log)")
        if code == rankcheck.EXIT_OTHER_NODE:
            return Ending(code, None, "another node failed the rank check")
        if code:
            return Ending(code, Outcome.crash, "the allocation check failed; its message is in the job's log")
        why = stop.requested()
        return Ending(0, Outcome.stopped if why else Outcome.done,
                      f"rank check stopped by {why}" if why else "rank check done")
    engine = preflight.ENGINES.get(cfg.backend.name)
    if engine is None:
        return _problem(preflight.EXIT_NOT_BUILT, f"there is no {cfg.backend.name.name} trainer; "
                                                  "train.rank_check_s=60 runs an allocation check instead")
    problem, code, resume = preflight.preflight(run_dir, record, engine)
    if problem:
        return _problem(code, problem)
    held = lock.claim(run_dir)  # one run, one writer: rank 0 holds RUN_DIR/run.lock while it trains
    if held:
        return _problem(EXIT_LOCKED, held)
    watchdog.start(run_dir, cfg.train.hang_timeout_s)  # from here a stall ends in the outcome hang (main stops it)
    if preflight.cpu_devices(cfg):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would pick CUDA where there is one
    for message in ENGINE_NOTICES:
        warnings.filterwarnings("ignore", message=message)
    from launch.train.loop import Trainer  # torch and the engine: after the checks above

    module = engine.build(run_dir, record, plan)
    try:
        trainer = seen.trainer = Trainer(run_dir, record, plan, module)
    except BaseException:
        module.close()
        raise
    try:
        watchdog.beat(phase="checkpoint load")
        if resume is not None:
            trainer.resume(resume)
        elif preflight.init_checkpoint(cfg):
            trainer.init_from(preflight.resolve_init(cfg, engine))  # what preflight checked
        code = trainer.train()
    finally:
        watchdog.beat(phase="closing")  # wandb's upload, the engine's teardown: timed afresh
        trainer.close()
    if trainer.step < trainer.steps:  # train() returns early only after a stop signal, with a checkpoint
        why = stop.requested() or "a stop signal on another rank"
        return Ending(code, Outcome.stopped, f"stopped by {why} at step {trainer.step}, checkpoint saved",
                      trainer.step)
    return Ending(code, Outcome.done, f"trained {trainer.step} steps", trainer.step)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
