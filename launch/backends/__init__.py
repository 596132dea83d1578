"""Backend translators: the typed config and its derived numbers -> the files each engine reads.

One translator per target, each a pure function with a golden-file test:

=========================  ==============================  ====================================
backend                    file in RUN_DIR                 function
=========================  ==============================  ====================================
deepspeed                  ds_config.json                  deepspeed.to_deepspeed(cfg, d)
deepspeed, stage=dpo       ds_reference_config.json        deepspeed.to_deepspeed_reference(cfg, d)
megatron (Megatron-Core)   megatron.yaml                   megatron.to_megatron(cfg, d)
megatron (Megatron-LM)     megatron_args.txt               megatron_lm.to_megatron_lm_args(cfg, d)
=========================  ==============================  ====================================

``artifacts`` gives render all of a run's files at once. Nothing here imports
torch, deepspeed or megatron: this runs on login nodes (megatron.resolve, the
trainer's side, imports them lazily).
"""

from __future__ import annotations

import json
from pathlib import Path

from launch.config.derive import Derived
from launch.config.schema import BackendName, Config, StageKind
from launch.backends.deepspeed import to_deepspeed, to_deepspeed_reference
from launch.backends.megatron import to_megatron_yaml
from launch.backends.megatron_lm import to_megatron_lm_args

FILES = ("ds_config.json", "ds_reference_config.json", "megatron.yaml", "megatron_args.txt")
"""Every file a translator writes into a run directory (for launch.record.write.ARTIFACTS)."""


def artifacts(cfg: Config, d: Derived, *, run_dir: Path | str | None = None,
              numbers: dict | None = None) -> dict[str, str]:
    """The backend's files for this run: name -> text.

    ``run_dir`` roots the default paths Megatron-LM writes to (checkpoints,
    TensorBoard, wandb); ``numbers`` (plan.json) supplies the estimator's
    checkpoint interval when ``train.checkpoint_interval`` is not set.
    """
    if cfg.backend.name == BackendName.deepspeed:
        files = {"ds_config.json": _json(to_deepspeed(cfg, d))}
        if cfg.stage.kind == StageKind.dpo:
            files["ds_reference_config.json"] = _json(to_deepspeed_reference(cfg, d))
        return files
    lines = to_megatron_lm_args(cfg, d, run_dir=str(run_dir) if run_dir else None,
                                save_interval=save_interval(cfg, numbers))
    return {"megatron.yaml": to_megatron_yaml(cfg, d), "megatron_args.txt": "\n".join(lines) + "\n"}


def save_interval(cfg: Config, numbers: dict | None) -> int | None:
    """Iterations between checkpoints: train.checkpoint_interval, else the plan's Young/Daly interval in steps."""
    if not numbers:
        return cfg.train.checkpoint_interval or None
    return checkpoint_steps(cfg.train.checkpoint_interval, numbers["run"]["checkpoint_interval_min"],
                            numbers["throughput"]["step_time_s"])


def checkpoint_steps(interval: int | None, interval_min: float, step_time_s: float) -> int | None:
    """``interval`` when set, else ``interval_min`` minutes in whole steps (at least 1): the one rule
    the translators and the trainers (``launch.record.read.PlanNumbers.save_interval``) share."""
    if interval:
        return interval
    return max(1, int(interval_min * 60 // step_time_s)) if step_time_s > 0 else None


def _json(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"
