"""``python -m launch.train RUN_DIR``: the entrypoint torchrun starts on every rank.

Reads the run record (``launch.record.read``: ``config.yaml`` typed and derived,
``plan.json`` typed), then runs the allocation check (``train.rank_check_s > 0``)
or trains: ``launch.train.preflight`` (no torch yet), the backend's ``TrainModule``
(``preflight.ENGINES``) inside the skeleton's ``Trainer`` (``launch.train.loop``).

Exit codes: 0 done or stopped (checkpoint saved); 2 a user error found on the
node (a damaged record, missing data, a changed config on resume, a private API an
installed engine lacks); 3 not built; 4 a GPU profile on a node without a usable GPU.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from launch.errors import UserError
from launch.record.read import read_config, read_plan
from launch.train import preflight, stop
from launch.train.metrics import err

ENGINE_NOTICES = (
    r"Transformer Engine and Apex are not installed", r"Apex is not installed", r"full scope is deprecated",
    r"`torch\.distributed\.\w+` is deprecated", r"`load_state_dict` is deprecated", r"Please use DTensor instead",
)
"""Notices megatron-core 0.16, DeepSpeed 0.19 and torch 2.13 print on every rank, some once per call
(thousands per run): none of them is about this run."""


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m launch.train RUN_DIR", file=sys.stderr)
        return preflight.EXIT_USER
    run_dir = Path(argv[0]).absolute()
    try:
        return _run(run_dir)
    except UserError as exc:
        err("\n".join(exc.problems))
        return preflight.EXIT_USER


def _run(run_dir: Path) -> int:
    record, plan = read_config(run_dir), read_plan(run_dir)
    cfg = record.cfg
    problem = preflight.device_problem(cfg)
    if problem:
        err(problem)
        return preflight.EXIT_NO_DEVICE
    if cfg.train.rank_check_s > 0:
        from launch.train.rankcheck import rank_check

        return rank_check(cfg, plan)
    engine = preflight.ENGINES.get(cfg.backend.name)
    if engine is None:
        err(f"there is no {cfg.backend.name.name} trainer; train.rank_check_s=60 runs an allocation check instead")
        return preflight.EXIT_NOT_BUILT
    problem, code, resume = preflight.preflight(run_dir, record, engine)
    if problem:
        err(problem)
        return code
    stop.install()
    if preflight.cpu_devices(cfg):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would pick CUDA where there is one
    for message in ENGINE_NOTICES:
        warnings.filterwarnings("ignore", message=message)
    from launch.train.loop import Trainer  # torch and the engine: after the checks above

    module = engine.build(run_dir, record, plan)
    try:
        trainer = Trainer(run_dir, record, plan, module)
    except BaseException:
        module.close()
        raise
    try:
        if resume is not None:
            trainer.resume(resume)
        elif preflight.init_checkpoint(cfg):
            trainer.init_from(Path(preflight.init_checkpoint(cfg)))
        return trainer.train()
    finally:
        trainer.close()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
